// pybind11 module megatron_amopo._planner; call it through megatron_amopo/data/planner.py, which
// validates every value. Here only buffer shapes are checked (so no read leaves an array); numpy
// makes the arrays C-contiguous int64 (safe casts only), and long loops release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

#include "packing.h"
#include "planner.h"

namespace py = pybind11;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style>;

void require(bool ok, const std::string& what) {
  if (!ok) throw py::value_error(what);
}

// Hands a vector to numpy without copying (the capsule owns it); 1-D unless `columns` is given.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v, py::ssize_t columns = 0) {
  auto* owned = new std::vector<int64_t>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  const auto size = static_cast<py::ssize_t>(owned->size());
  std::vector<py::ssize_t> shape{size};
  if (columns > 0) shape = {size / columns, columns};
  return py::array_t<int64_t>(shape, owned->data(), free_when_done);
}

py::tuple plan_microbatches(const Int64Array& max_len, const Int64Array& total_len,
                            const Int64Array& seq_lens, int64_t seq_length, int64_t seqs_per_group,
                            int64_t num_epochs, uint64_t seed, int64_t dp_rank, int64_t dp_size,
                            int64_t groups_per_microbatch, int64_t token_budget, bool packed,
                            int64_t window, int64_t num_threads, bool thd) {
  const auto G = static_cast<int64_t>(max_len.size());
  require(max_len.ndim() == 1 && total_len.ndim() == 1 && total_len.size() == G,
          "max_len and total_len must be 1-D arrays of the same length");
  const amopo::PlanOptions o{seqs_per_group, num_epochs, seed,   dp_rank,
                             dp_size,        groups_per_microbatch, token_budget, packed,
                             thd,            window,     seq_length, num_threads};
  if (o.packed_budget())
    require(seq_lens.ndim() == 2 && seq_lens.shape(0) == G && seq_lens.shape(1) == seqs_per_group,
            "a packed token budget needs seq_lens [G, seqs_per_group]");
  amopo::Plan plan;
  {
    py::gil_scoped_release release;  // the arguments keep the buffers alive
    plan = amopo::plan_microbatches(o, max_len.data(), total_len.data(), seq_lens.data(), G);
  }
  return py::make_tuple(to_numpy(std::move(plan.offsets)), to_numpy(std::move(plan.group_ids)),
                        to_numpy(std::move(plan.epochs)), plan.dropped_groups);
}

py::array_t<int64_t> packed_shapes(const Int64Array& seq_lens, int64_t seq_length) {
  require(seq_lens.ndim() == 2 && seq_lens.shape(1) >= 1, "seq_lens must be [G, n] with n >= 1");
  const int64_t G = seq_lens.shape(0), n = seq_lens.shape(1);
  std::vector<int64_t> shapes(2 * G);
  {
    py::gil_scoped_release release;
    std::vector<int64_t> items(n), free, loads;
    for (int64_t g = 0; g < G; ++g) {
      amopo::sort_lengths(seq_lens.data() + g * n, n, items.data());
      const auto shape = amopo::packed_shape(items.data(), n, seq_length, free, loads);
      shapes[2 * g] = shape.first;
      shapes[2 * g + 1] = shape.second;
    }
  }
  return to_numpy(std::move(shapes), 2);
}

bool packed_fits(const Int64Array& seq_lens, int64_t seq_length, int64_t budget) {
  require(seq_lens.ndim() == 1 && seq_lens.size() >= 1, "seq_lens must be 1-D and not empty");
  const auto n = static_cast<int64_t>(seq_lens.size());
  std::vector<int64_t> items(n), free, loads;
  amopo::sort_lengths(seq_lens.data(), n, items.data());
  int64_t total = 0;
  for (int64_t len : items) total += len;
  if (total > budget) return false;  // fits_budget's precondition
  return amopo::fits_budget(items.data(), n, total, seq_length, budget, 1, free, loads);
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
  m.doc() = "C++ micro-batch planner for AMoPO groups; call it through megatron_amopo.data.planner.";
  m.def("plan_microbatches", &plan_microbatches, py::arg("max_len"), py::arg("total_len"),
        py::arg("seq_lens"), py::arg("seq_length"), py::arg("seqs_per_group"), py::arg("num_epochs"),
        py::arg("seed"), py::arg("dp_rank"), py::arg("dp_size"), py::arg("groups_per_microbatch"),
        py::arg("token_budget"), py::arg("packed"), py::arg("window"), py::arg("num_threads") = 1,
        py::arg("thd") = false,
        "(offsets[M + 1], group_ids, epochs[M], dropped_groups) of one DP rank, for validated inputs.");
  m.def("packed_shapes", &packed_shapes, py::arg("seq_lens"), py::arg("seq_length"),
        "[G, 2]: (rows, width) of the ROW RULE for each row of seq_lens [G, n].");
  m.def("packed_fits", &packed_fits, py::arg("seq_lens"), py::arg("seq_length"), py::arg("budget"),
        "Whether rows * width of the ROW RULE for seq_lens is <= budget, by the planner's fit test.");
}
