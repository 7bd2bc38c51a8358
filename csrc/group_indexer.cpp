/* Micro-batch planner for AMoPO groups (module megatron_amopo._indexer).
 *
 * An AMoPO group is one training sample made of 2P token sequences that must
 * share a micro-batch. plan_microbatches() decides, per epoch, which groups go
 * into which micro-batch and which data-parallel rank gets it. The algorithm is
 * written down in megatron_amopo/data/indexer.py; the pure-Python reference
 * there must produce bit-identical plans, so every step below (PRNG, shuffle,
 * stable sort, greedy fill, rank split) mirrors it exactly.
 *
 * Shape legend: G groups, E epochs, Me micro-batches of one epoch, M micro-batches
 * kept for this rank (all epochs), N group slots of this rank (= offsets[M]).
 *
 * Style follows megatron/core/datasets/helpers.cpp: a thin pybind11 module that
 * builds index arrays with the GIL released and hands them to numpy through a
 * capsule (no copy). A packed or THD token budget plans its windows on num_threads
 * std::threads (windows are independent; the plan does not depend on the count).
 */

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// Limits that keep every cost inside int64, or int128 for the padded fill check.
constexpr int64_t kMaxLength = int64_t{1} << 40;
constexpr int64_t kMaxSeqsPerGroup = int64_t{1} << 20;
constexpr int64_t kMaxBudget = int64_t{1} << 62;
constexpr int64_t kMaxThreads = 256;

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64 output function (Steele, Lea, Flood 2014); wraps modulo 2^64.
inline uint64_t fmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// One independent splitmix64 stream per (seed, epoch, stream id).
// stream 0 shuffles groups, stream 1 shuffles the epoch's micro-batches.
class SplitMix64 {
 public:
  SplitMix64(uint64_t seed, uint64_t epoch, uint64_t stream) {
    uint64_t s = fmix64(seed + kGolden);
    s = fmix64((s ^ epoch) + kGolden);
    state_ = fmix64((s ^ stream) + kGolden);
  }
  uint64_t next() {
    state_ += kGolden;
    return fmix64(state_);
  }

 private:
  uint64_t state_;
};

// Fisher-Yates from the back; j = floor(draw * (i + 1) / 2^64), Lemire's
// multiply-shift without rejection: no division, bias < n / 2^64 (negligible).
template <typename T>
void shuffle(std::vector<T>& a, SplitMix64& rng) {
  for (int64_t i = static_cast<int64_t>(a.size()) - 1; i > 0; --i) {
    const auto wide = static_cast<unsigned __int128>(rng.next()) * static_cast<uint64_t>(i + 1);
    const auto j = static_cast<int64_t>(wide >> 64);
    std::swap(a[i], a[j]);
  }
}

struct Options {
  int64_t seqs_per_group;
  int64_t num_epochs;
  uint64_t seed;
  int64_t dp_rank;
  int64_t dp_size;
  int64_t groups_per_microbatch;  // > 0: fixed k; 0: token budget mode
  int64_t token_budget;           // > 0: token budget mode; 0: fixed k
  bool packed;                    // cost (and sort key): packed total_len, else padded max_len
  bool thd;                       // cost: the sum of total_len (one THD stream); not with packed
  int64_t window;
  int64_t seq_length;             // packed token budget: longest row S (0 otherwise)
  int64_t num_threads;            // packed or THD token budget: workers planning windows (>= 1)
  bool packed_budget() const { return packed && token_budget > 0; }
  bool thd_budget() const { return thd && token_budget > 0; }
};

struct Plan {
  std::vector<int64_t> offsets_M1{0};
  std::vector<int64_t> group_ids_N;
  std::vector<int64_t> epochs_M;
  int64_t dropped_groups = 0;
};

// Every caller streams into a std::ostringstream; the cast recovers it.
[[noreturn]] void fail(std::ostream& msg) {
  throw py::value_error(static_cast<std::ostringstream&>(msg).str());
}

const int64_t* int64_vector(const py::array& a, const char* name) {
  if (!a.dtype().is(py::dtype::of<int64_t>())) {
    throw py::type_error(std::string(name) + " must have dtype int64, got " +
                         std::string(py::str(a.dtype())));
  }
  if (a.ndim() != 1 || !(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be a 1-D C-contiguous int64 array");
  }
  return static_cast<const int64_t*>(a.data());
}

// Runs work(worker) on `threads` workers (the calling thread is worker 0) and rethrows the
// first exception any of them raised.
void run_workers(int64_t threads, const std::function<void(int64_t)>& work) {
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int64_t worker) {
    try {
      work(worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(guarded, t);
  guarded(0);
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

void check_options(const Options& o, int64_t num_groups) {
  std::ostringstream m;
  if (num_groups < 1) fail(m << "need at least one group, got " << num_groups);
  if (o.seqs_per_group < 2 || o.seqs_per_group % 2 != 0 || o.seqs_per_group > kMaxSeqsPerGroup)
    fail(m << "seqs_per_group must be an even number 2P in [2, 2^20], got " << o.seqs_per_group);
  if (o.num_epochs < 1) fail(m << "num_epochs must be >= 1, got " << o.num_epochs);
  if (o.dp_size < 1) fail(m << "dp_size must be >= 1, got " << o.dp_size);
  if (o.dp_rank < 0 || o.dp_rank >= o.dp_size)
    fail(m << "dp_rank must be in [0, dp_size=" << o.dp_size << "), got " << o.dp_rank);
  if (o.window < 1) fail(m << "window must be >= 1, got " << o.window);
  if ((o.groups_per_microbatch > 0) == (o.token_budget > 0))
    fail(m << "give exactly one of groups_per_microbatch > 0 or token_budget > 0, got "
           << o.groups_per_microbatch << " and " << o.token_budget);
  if (o.groups_per_microbatch < 0 || o.token_budget < 0 || o.token_budget > kMaxBudget)
    fail(m << "groups_per_microbatch must be >= 0 and token_budget in [0, 2^62], got "
           << o.groups_per_microbatch << " and " << o.token_budget);
  if (o.packed && o.thd) fail(m << "give at most one of packed and thd (the cost), got both");
  if (o.num_threads < 1 || o.num_threads > kMaxThreads)
    fail(m << "num_threads must be in [1, " << kMaxThreads << "], got " << o.num_threads);
}

// Branchless bisection: the first index i of a[0..size) with !before(a[i]), where
// before(a[i]) holds for a prefix of a (the arrays here are a few dozen values, where
// unpredictable branches cost more than the extra steps).
template <typename Before>
inline int64_t partition_index(const int64_t* a, int64_t size, Before before) {
  if (size == 0) return 0;
  const int64_t* base = a;
  for (int64_t n = size; n > 1;) {
    const int64_t half = n / 2;
    base = before(base[half - 1]) ? base + half : base;
    n -= half;
  }
  return (base - a) + before(*base);
}

// Best fit (the rule of megatron_amopo.data.indexer_ref.best_fit): each item of
// items[0..n) (non-increasing) goes into the row with the least free space that
// holds it, else into a new row of seq_length. free is the rows' free space,
// ascending (a multiset: which row is which does not change the count). Returns
// false as soon as more than max_rows rows would be needed.
bool best_fit(std::vector<int64_t>& free, const int64_t* items, int64_t n, int64_t seq_length,
              int64_t max_rows) {
  // Items longer than seq_length / 2 come first and each opens a row: every open row
  // already holds one of them, so its free space is < seq_length / 2. Their free space
  // seq_length - items[i] is ascending already.
  int64_t i = partition_index(items, n, [&](int64_t len) { return 2 * len > seq_length; });
  if (i > max_rows) return false;
  free.resize(i);
  for (int64_t r = 0; r < i; ++r) free[r] = seq_length - items[r];
  for (; i < n; ++i) {
    const int64_t len = items[i];
    int64_t* f = free.data();
    auto size = static_cast<int64_t>(free.size());
    // The row with the least free space that holds len.
    int64_t at = partition_index(f, size, [&](int64_t room) { return room < len; });
    int64_t left;
    if (at < size) {
      left = f[at] - len;  // < f[at]: its sorted place is at or before at
    } else if (size < max_rows) {
      left = seq_length - len;
      free.push_back(0);
      f = free.data();
      at = size;
    } else {
      return false;
    }
    // Insert after equal values (Python's insort), shifting f[j..at) up by one; a plain
    // loop, as memmove calls cost more than they move on a few values.
    const int64_t j = partition_index(f, at, [&](int64_t room) { return room <= left; });
    for (int64_t r = at; r > j; --r) f[r] = f[r - 1];
    f[j] = left;
  }
  return true;
}

// A group's 2P sequence lengths src[0..spg), longest first, into out[0..spg) (insertion
// sort when 2P is small).
void sort_lengths(const int64_t* src, int64_t spg, int64_t* out) {
  if (spg > 32) {
    std::copy(src, src + spg, out);
    std::sort(out, out + spg, std::greater<int64_t>());
    return;
  }
  for (int64_t i = 0; i < spg; ++i) {
    const int64_t v = src[i];
    int64_t j = i;
    while (j > 0 && out[j - 1] < v) {
      out[j] = out[j - 1];
      --j;
    }
    out[j] = v;
  }
}

// Longest-processing-time (indexer_ref.balanced_width): items[0..n) (non-increasing)
// each into the least-loaded of `rows` rows; returns the fullest row, or a value above
// cap as soon as one row passes cap. loads is scratch, a binary min-heap as in the
// reference (a multiset: which row wins a tie does not change the loads).
int64_t balanced_width(const int64_t* items, int64_t n, int64_t rows, int64_t cap,
                       std::vector<int64_t>& loads) {
  if (items[0] > cap) return items[0];
  if (n <= rows) return items[0];  // one sequence per row
  loads.resize(rows);
  int64_t* l = loads.data();
  // The first `rows` open a row each; ascending order is a valid heap.
  for (int64_t r = 0; r < rows; ++r) l[r] = items[rows - 1 - r];
  for (int64_t i = rows; i < n; ++i) {
    const int64_t v = l[0] + items[i];
    if (v > cap) return v;
    int64_t pos = 0;  // sift v down from the root (heapreplace)
    for (int64_t child = 1; child < rows; child = 2 * pos + 1) {
      child += child + 1 < rows && l[child + 1] < l[child];
      if (l[child] >= v) break;
      l[pos] = l[child];
      pos = child;
    }
    l[pos] = v;
  }
  return *std::max_element(l, l + rows);
}

// The ROW RULE's (rows, width) for items[0..n) (non-increasing), as indexer_ref.packed_shape:
// best fit decreasing into rows of seq_length, then longest-processing-time into R rows for
// R = ceil(sum / seq_length) .. R0; the first candidate with the least R * W wins.
std::pair<int64_t, int64_t> packed_shape(const int64_t* items, int64_t n, int64_t seq_length,
                                         std::vector<int64_t>& free, std::vector<int64_t>& loads) {
  best_fit(free, items, n, seq_length, n);
  std::pair<int64_t, int64_t> best{static_cast<int64_t>(free.size()), seq_length - free[0]};
  __int128 best_cost = static_cast<__int128>(best.first) * best.second;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += items[i];
  for (int64_t rows = (total + seq_length - 1) / seq_length; rows <= best.first; ++rows) {
    const int64_t width = balanced_width(items, n, rows, seq_length, loads);
    if (width <= seq_length && static_cast<__int128>(rows) * width < best_cost) {
      best = {rows, width};
      best_cost = static_cast<__int128>(rows) * width;
    }
  }
  return best;
}

// Martello and Toth's lower bound L2 for bin packing (Discrete Applied Mathematics 28(1),
// 1990, 59-70): whether items[0..n) (non-increasing, items[0] <= cap, summing to total) might
// fit in `rows` rows of capacity cap; false only if no packing at all does. The h items above
// cap / 2 need a row each; for K = items[t] <= cap / 2, the items in [K, cap / 2] fit only into
// the space left free by the big items <= cap - K (no other item fits beside those above it) or
// into the rows - h other rows. One sweep over t, O(n).
bool may_fit_rows(const int64_t* items, int64_t n, int64_t total, int64_t cap, int64_t rows) {
  if (total > rows * cap) return false;  // rows * cap <= budget < 2^63 (callers)
  const int64_t h = partition_index(items, n, [&](int64_t len) { return 2 * len > cap; });
  if (h > rows) return false;
  const int64_t spare = (rows - h) * cap;
  int64_t small = 0, room = 0, p = h;  // room: free space of the big rows items[p..h)
  for (int64_t t = h; t < n; ++t) {
    small += items[t];
    while (p > 0 && items[p - 1] <= cap - items[t]) room += cap - items[--p];
    if (small - room > spare) return false;
  }
  return true;
}

// Whether some packing of items[0..n) into `rows` rows of width W <= seq_length has
// rows * W <= budget: W >= items[0]; rows * W >= total; with n > R, two of the R + 1 longest
// share a row; with n > 2R, three of the 2R + 1 longest do; and L2 above. Every candidate of
// the ROW RULE is such a packing, so a false here rejects it without placing anything.
bool rows_may_fit(const int64_t* items, int64_t n, int64_t total, int64_t rows, int64_t seq_length,
                  int64_t budget) {
  const int64_t cap = std::min(seq_length, budget / rows);
  if (items[0] > cap) return false;
  if (n > rows && items[rows - 1] + items[rows] > cap) return false;
  if (n > 2 * rows && items[2 * rows - 2] + items[2 * rows - 1] + items[2 * rows] > cap) return false;
  return may_fit_rows(items, n, total, cap, rows);
}

// Whether the ROW RULE lays items[0..n) (non-increasing, summing to total) out in R * W <=
// budget tokens, i.e. whether some candidate of packed_shape does; without computing the
// least one. rows_at_least: a lower bound on R that the caller knows (1 if none). Rows R
// that rows_may_fit rules out are skipped (if it rules out all of max(rows_at_least,
// ceil(total / S)) .. budget / items[0], nothing is placed at all); best fit stops as soon
// as it needs more than budget / items[0] rows.
bool fits_budget(const int64_t* items, int64_t n, int64_t total, int64_t seq_length, int64_t budget,
                 int64_t rows_at_least, std::vector<int64_t>& free, std::vector<int64_t>& loads) {
  const int64_t max_rows = std::min(n, budget / items[0]);  // candidates never have R > n
  auto may_fit = [&](int64_t rows) { return rows_may_fit(items, n, total, rows, seq_length, budget); };
  int64_t first = std::max(rows_at_least, (total + seq_length - 1) / seq_length);
  while (first <= max_rows && !may_fit(first)) ++first;
  if (first > max_rows) return false;
  // Best fit's layout fits, or longest-processing-time's for some R in [first, R0] (R0 >
  // max_rows when best fit stops early).
  int64_t last = max_rows;
  if (best_fit(free, items, n, seq_length, max_rows)) {
    const auto r0 = static_cast<int64_t>(free.size());
    if (static_cast<__int128>(r0) * (seq_length - free[0]) <= budget) return true;
    last = r0;
  }
  for (int64_t rows = first; rows <= last; ++rows) {
    if (rows > first && !may_fit(rows)) continue;
    const int64_t cap = std::min(seq_length, budget / rows);
    if (balanced_width(items, n, rows, cap, loads) <= cap) return true;
  }
  return false;
}

int64_t group_cost(const Options& o, int64_t max_len, int64_t total_len) {
  return o.packed || o.thd ? total_len : o.seqs_per_group * max_len;
}

// Packed token budget: per-sequence lengths in [1, seq_length], consistent with
// max_len/total_len, and every group alone within the budget (its R * W).
void check_seq_lens(const Options& o, const int64_t* max_len, const int64_t* total_len,
                    const int64_t* seq_lens, int64_t G) {
  std::ostringstream m;
  const int64_t spg = o.seqs_per_group;
  for (int64_t g = 0; g < G; ++g) {
    int64_t mx = 0, sum = 0;
    for (int64_t j = 0; j < spg; ++j) {
      const int64_t len = seq_lens[g * spg + j];
      if (len < 1 || len > o.seq_length)
        fail(m << "group " << g << ": sequence lengths must be in [1, seq_length=" << o.seq_length
               << "], got " << len << " at index " << j);
      mx = std::max(mx, len);
      sum += len;
    }
    if (mx != max_len[g] || sum != total_len[g])
      fail(m << "group " << g << ": seq_lens give max " << mx << " and sum " << sum
             << ", but max_len=" << max_len[g] << " total_len=" << total_len[g]);
  }
  // Each group alone within the budget, checked by fits_budget (cheaper than the exact
  // shape) on contiguous chunks in parallel; the exact shapes only for the error message.
  const int64_t threads = std::min(o.num_threads, (G + 4095) / 4096);
  std::vector<int64_t> first_over(threads, G);
  run_workers(threads, [&](int64_t t) {
    std::vector<int64_t> buf(spg), free, loads;
    for (int64_t g = G * t / threads; g < G * (t + 1) / threads; ++g) {
      sort_lengths(seq_lens + g * spg, spg, buf.data());
      if (!fits_budget(buf.data(), spg, total_len[g], o.seq_length, o.token_budget, 1, free, loads)) {
        first_over[t] = g;
        return;
      }
    }
  });
  const int64_t over = *std::min_element(first_over.begin(), first_over.end());
  if (over == G) return;
  std::vector<int64_t> buf(spg), free, loads;
  int64_t worst = 0;
  std::pair<int64_t, int64_t> over_shape{0, 0};
  for (int64_t g = 0; g < G; ++g) {
    sort_lengths(seq_lens + g * spg, spg, buf.data());
    const auto shape = packed_shape(buf.data(), spg, o.seq_length, free, loads);
    worst = std::max(worst, shape.first * shape.second);  // <= 2P * seq_length <= 2^60
    if (g == over) over_shape = shape;
  }
  fail(m << "group " << over << " alone costs " << over_shape.first * over_shape.second
         << " tokens (packed: " << over_shape.first << " rows of " << over_shape.second
         << " positions), above token_budget=" << o.token_budget
         << "; the minimum budget that fits every group is " << worst);
}

// Lengths must be consistent (max <= total <= 2P * max) and no single group may
// exceed the token budget; checked before any planning work.
void check_lengths(const Options& o, const int64_t* max_len, const int64_t* total_len,
                   const int64_t* seq_lens, int64_t G) {
  std::ostringstream m;
  int64_t worst = 0;
  int64_t first_over = -1;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t ml = max_len[g], tl = total_len[g];
    if (ml < 1 || ml > kMaxLength || tl < 1 || tl > kMaxLength)
      fail(m << "group " << g << ": lengths must be in [1, 2^40], got max_len=" << ml
             << " total_len=" << tl);
    if (tl < ml || tl > o.seqs_per_group * ml)
      fail(m << "group " << g << ": need max_len <= total_len <= seqs_per_group * max_len, got "
             << "max_len=" << ml << " total_len=" << tl << " seqs_per_group=" << o.seqs_per_group);
    const int64_t c = group_cost(o, ml, tl);
    worst = std::max(worst, c);
    if (o.token_budget > 0 && c > o.token_budget && first_over < 0) first_over = g;
  }
  if (o.packed_budget()) return check_seq_lens(o, max_len, total_len, seq_lens, G);
  if (first_over >= 0)
    fail(m << "group " << first_over << " alone costs "
           << group_cost(o, max_len[first_over], total_len[first_over]) << " tokens ("
           << (o.thd ? "thd: the sum of its sequence lengths" : o.packed ? "packed" : "padded")
           << "), above token_budget=" << o.token_budget
           << "; the minimum budget that fits every group is " << worst);
}

// One epoch's order after steps 1-2: group ids and their length keys, window by window.
struct EpochOrder {
  std::vector<int64_t> group;
  std::vector<int64_t> key;
};

struct Keyed {
  int64_t key;
  int64_t group;
};

// LSD radix sort on the key, one byte per pass, as many passes as the largest
// key needs (lengths are small: 1-2 passes). Counting passes are stable, which is
// what step 2 asks for, and beat comparison sorts on windows of a few hundred.
void radix_sort(std::vector<Keyed>& a, std::vector<Keyed>& tmp) {
  int64_t max_key = 0;
  for (const Keyed& x : a) max_key = std::max(max_key, x.key);
  tmp.resize(a.size());
  for (int shift = 0; shift < 64 && (max_key >> shift) > 0; shift += 8) {
    std::array<int64_t, 257> start{};
    for (const Keyed& x : a) ++start[((x.key >> shift) & 255) + 1];
    for (int b = 0; b < 256; ++b) start[b + 1] += start[b];
    for (const Keyed& x : a) tmp[start[(x.key >> shift) & 255]++] = x;
    a.swap(tmp);
  }
}

// Step 2: stable-sort each window of the shuffled ids by the length key.
template <typename Id>
void sort_windows(const std::vector<Id>& ids, const int64_t* key, int64_t window, EpochOrder* out) {
  const auto G = static_cast<int64_t>(ids.size());
  std::vector<Keyed> buf, tmp;
  for (int64_t lo = 0; lo < G; lo += window) {
    const int64_t hi = std::min(G, lo + window);
    buf.clear();
    for (int64_t i = lo; i < hi; ++i) buf.push_back(Keyed{key[ids[i]], static_cast<int64_t>(ids[i])});
    if (hi - lo > 1) radix_sort(buf, tmp);
    for (int64_t i = lo; i < hi; ++i) {
      out->key[i] = buf[i - lo].key;
      out->group[i] = buf[i - lo].group;
    }
  }
}

// Step 2 (fill): returns micro-batch start positions into the order, plus the end.
// The key is max_len (padded budget) or the sort key (fixed k, unused).
// Fixed k drops a short last run (its groups are counted in *tail_dropped).
std::vector<int64_t> fill(const Options& o, const std::vector<int64_t>& key, int64_t* tail_dropped) {
  const auto G = static_cast<int64_t>(key.size());
  std::vector<int64_t> bounds{0};
  if (o.groups_per_microbatch > 0) {
    const int64_t k = o.groups_per_microbatch;
    for (int64_t s = k; s <= G; s += k) bounds.push_back(s);
    *tail_dropped = G - bounds.back();
    return bounds;
  }
  int64_t n = 0, cur_max = 0;
  for (int64_t pos = 0; pos < G; ++pos) {
    // Padded budget (packed budgets go to fill_packed). 2P*(n+1)*max can pass 2^63
    // (max <= 2^40, 2P*n <= budget): use 128 bits.
    const __int128 cost = static_cast<__int128>(o.seqs_per_group * (n + 1)) * std::max(cur_max, key[pos]);
    if (n > 0 && cost > o.token_budget) {
      bounds.push_back(pos);
      n = cur_max = 0;
    }
    ++n;
    cur_max = std::max(cur_max, key[pos]);
  }
  bounds.push_back(G);
  *tail_dropped = 0;
  return bounds;
}

// A window's group with what the packed fill needs at hand (no scattered loads).
struct Candidate {
  int64_t total;
  int64_t longest;
  int64_t wide;  // sequences longer than S / 2: at most one per row
  int64_t mid;   // sequences in (S / 3, S / 2]: at most two per row, one beside a wide one
  int64_t group;
  const int64_t* lens;  // its 2P lengths, longest first
};

// Rows that any packing of sequences with these counts needs (see Candidate), for rows
// of at most S positions: each row holds one wide sequence and one mid one, or two mid.
inline int64_t min_rows_by_count(int64_t wide, int64_t mid) {
  return wide + (std::max<int64_t>(0, mid - wide) + 1) / 2;
}

// Merges a[0..na) and b[0..nb) (both non-increasing) into out: each b[j] goes after the
// values of a that are >= it, found by bisection (b is one group, a few values; a is the
// micro-batch, a few dozen); the runs of a between are copied.
void merge_desc(const int64_t* a, int64_t na, const int64_t* b, int64_t nb, int64_t* out) {
  int64_t from = 0;
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t v = b[j];
    const int64_t to = from + partition_index(a + from, na - from, [&](int64_t x) { return x >= v; });
    for (; from < to; ++from) *out++ = a[from];
    *out++ = v;
  }
  for (; from < na; ++from) *out++ = a[from];
}

// Scratch of one worker, reused across candidates, micro-batches and windows.
struct FillScratch {
  std::vector<int64_t> items, merged, free, loads, sorted, suffix_min;
  std::vector<Candidate> rem;
  std::vector<char> taken;
};

// Step 2, packed token budget, for the window order[lo, hi): a micro-batch starts with the
// window's largest remaining group (the window is sorted by total_len, largest first) and
// takes every later remaining group, in order, whose tokens fit the free tokens (budget -
// tokens so far) and with which the ROW RULE lays all the micro-batch's sequences out in
// R * W <= budget (fits_budget). Writes the window's groups, micro-batch after micro-batch,
// to out[lo, hi) and sets starts[pos] where a micro-batch starts.
void fill_window(const Options& o, const int64_t* max_len, const int64_t* total_len,
                 const int64_t* seq_lens, const int64_t* order, int64_t lo, int64_t hi,
                 int64_t* out, char* starts, FillScratch& s) {
  const int64_t spg = o.seqs_per_group, S = o.seq_length, B = o.token_budget;
  s.sorted.resize((hi - lo) * spg);  // not resized below: the lens pointers stay valid
  s.rem.clear();
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t g = order[i];
    int64_t* lens = s.sorted.data() + (i - lo) * spg;
    sort_lengths(seq_lens + g * spg, spg, lens);
    int64_t wide = 0, mid = 0;
    for (int64_t j = 0; j < spg; ++j) {
      wide += 2 * lens[j] > S;
      mid += 2 * lens[j] <= S && 3 * lens[j] > S;
    }
    s.rem.push_back(Candidate{total_len[g], max_len[g], wide, mid, g, lens});
  }
  std::vector<Candidate>& rem = s.rem;
  int64_t written = lo;
  while (!rem.empty()) {
    s.taken.assign(rem.size(), 0);
    s.taken[0] = 1;
    s.items.assign(rem[0].lens, rem[0].lens + spg);
    int64_t tokens = rem[0].total, longest = rem[0].longest, wide = rem[0].wide, mid = rem[0].mid;
    starts[written] = 1;
    out[written++] = rem[0].group;
    s.suffix_min.resize(rem.size() + 1);
    s.suffix_min[rem.size()] = std::numeric_limits<int64_t>::max() / 4;
    for (size_t i = rem.size(); i-- > 0;) s.suffix_min[i] = std::min(s.suffix_min[i + 1], rem[i].wide);
    auto pos = rem.begin() + 1;
    while (true) {
      const int64_t free_tokens = B - tokens;
      pos = std::partition_point(pos, rem.end(),
                                 [&](const Candidate& c) { return c.total > free_tokens; });
      if (pos == rem.end()) break;
      // Not in the Python reference, same plan: R >= the rows the counts of wide and mid
      // sequences need and W >= the longest hold for every layout of the ROW RULE, so these
      // tests only skip groups the rule rejects (the first one rejects every later group).
      if (static_cast<__int128>(wide + s.suffix_min[pos - rem.begin()]) * longest > B) break;
      const Candidate c = *pos++;
      const int64_t rows = min_rows_by_count(wide + c.wide, mid + c.mid);
      if (static_cast<__int128>(rows) * std::max(longest, c.longest) > B) continue;
      s.merged.resize(s.items.size() + spg);
      merge_desc(s.items.data(), static_cast<int64_t>(s.items.size()), c.lens, spg, s.merged.data());
      if (!fits_budget(s.merged.data(), static_cast<int64_t>(s.merged.size()), tokens + c.total, S,
                       B, rows, s.free, s.loads))
        continue;
      s.items.swap(s.merged);
      tokens += c.total;
      longest = std::max(longest, c.longest);
      wide += c.wide;
      mid += c.mid;
      s.taken[pos - 1 - rem.begin()] = 1;
      out[written++] = c.group;
    }
    size_t kept = 0;
    for (size_t i = 0; i < rem.size(); ++i)
      if (!s.taken[i]) rem[kept++] = rem[i];
    rem.resize(kept);
  }
}

// Step 2 for a token budget planned window by window (packed, THD): fill(lo, hi, out, starts,
// scratch) plans the window order[lo, hi) into out[lo, hi) and marks micro-batch starts.
// Windows are independent and each writes only its own slots of out, so workers take
// windows in turns from a shared counter and the plan is the same for any number of
// threads. Returns the micro-batch bounds into out (incl. the end).
template <typename Scratch, typename FillWindow>
std::vector<int64_t> fill_windows(const Options& o, int64_t G, int64_t* out, const FillWindow& fill) {
  const int64_t num_windows = (G + o.window - 1) / o.window;
  std::vector<char> starts(G, 0);
  std::atomic<int64_t> next{0};
  run_workers(std::min(o.num_threads, num_windows), [&](int64_t) {
    Scratch scratch;
    for (int64_t w; (w = next.fetch_add(1)) < num_windows;) {
      const int64_t lo = w * o.window;
      fill(lo, std::min(G, lo + o.window), out, starts.data(), scratch);
    }
  });
  std::vector<int64_t> bounds;
  for (int64_t pos = 0; pos < G; ++pos)
    if (starts[pos]) bounds.push_back(pos);
  bounds.push_back(G);
  return bounds;
}

std::vector<int64_t> fill_packed(const Options& o, const int64_t* max_len, const int64_t* total_len,
                                 const int64_t* seq_lens, const std::vector<int64_t>& order,
                                 std::vector<int64_t>* out) {
  out->resize(order.size());
  return fill_windows<FillScratch>(
      o, static_cast<int64_t>(order.size()), out->data(),
      [&](int64_t lo, int64_t hi, int64_t* dst, char* starts, FillScratch& s) {
        fill_window(o, max_len, total_len, seq_lens, order.data(), lo, hi, dst, starts, s);
      });
}

// Scratch of one THD worker: the window's groups and total_len (non-increasing) and, per
// position, the next position that may still be remaining (a union-find over taken positions).
struct ThdScratch {
  std::vector<int64_t> groups, tokens, next;
};

// The first remaining position >= i (n if none), halving the path as it goes.
inline int64_t next_remaining(std::vector<int64_t>& next, int64_t i) {
  while (next[i] != i) {
    next[i] = next[next[i]];
    i = next[i];
  }
  return i;
}

// Step 2, THD token budget (indexer_ref.fill_thd), for the window order[lo, hi) sorted by
// total_len, largest first: a micro-batch starts with the largest remaining group and takes,
// in order, every later remaining group whose tokens fit the free tokens. As the tokens are
// non-increasing, the next group taken is the first remaining one at or after the first
// position whose tokens fit: a bisection, then a union-find jump over taken positions, so
// a window costs O(n log n) instead of the reference's rescans.
// The window is copied to scratch first, so out may be the order itself (planned in place).
void fill_thd_window(const Options& o, const EpochOrder& order, int64_t top, int64_t lo, int64_t hi,
                     int64_t* out, char* starts, ThdScratch& s) {
  const int64_t n = hi - lo;
  s.tokens.resize(n);
  for (int64_t i = 0; i < n; ++i) s.tokens[i] = top - order.key[lo + i];  // total_len
  s.groups.assign(order.group.begin() + lo, order.group.begin() + hi);
  s.next.resize(n + 1);
  std::iota(s.next.begin(), s.next.end(), int64_t{0});
  const int64_t* tokens = s.tokens.data();
  int64_t written = lo;
  int64_t last = n - 1;  // the last remaining position (its tokens are the fewest left)
  for (int64_t first = 0; (first = next_remaining(s.next, first)) < n;) {
    starts[written] = 1;
    out[written++] = s.groups[first];
    s.next[first] = first + 1;
    int64_t room = o.token_budget - tokens[first];
    for (int64_t pos = first + 1;;) {
      while (last > first && s.next[last] != last) --last;  // remaining: next[i] == i
      if (last <= first || tokens[last] > room) break;  // nothing left fits: skip the search
      pos += partition_index(tokens + pos, n - pos, [&](int64_t t) { return t > room; });
      const int64_t j = next_remaining(s.next, pos);
      if (j == n) break;
      out[written++] = s.groups[j];
      s.next[j] = j + 1;
      room -= tokens[j];
      pos = j + 1;  // [old pos, j] is taken: the next one lies beyond j
    }
  }
}

// Plans order->group in place; order->key holds top - total_len (the descending sort key),
// already gathered in order.
std::vector<int64_t> fill_thd(const Options& o, int64_t top, EpochOrder* order) {
  return fill_windows<ThdScratch>(
      o, static_cast<int64_t>(order->group.size()), order->group.data(),
      [&](int64_t lo, int64_t hi, int64_t* dst, char* starts, ThdScratch& s) {
        fill_thd_window(o, *order, top, lo, hi, dst, starts, s);
      });
}

// Steps 3-4 for one epoch: shuffle micro-batches, keep whole rounds of dp_size,
// append this rank's share (micro-batch j goes to rank j % dp_size).
void assign_epoch(const Options& o, int64_t epoch, const std::vector<int64_t>& order,
                  const std::vector<int64_t>& bounds, Plan* plan) {
  const auto Me = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<int64_t> perm(Me);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  SplitMix64 rng(o.seed, static_cast<uint64_t>(epoch), 1);
  shuffle(perm, rng);
  const int64_t kept = Me - Me % o.dp_size;
  for (int64_t j = kept; j < Me; ++j) plan->dropped_groups += bounds[perm[j] + 1] - bounds[perm[j]];
  for (int64_t j = o.dp_rank; j < kept; j += o.dp_size) {
    const int64_t mb = perm[j];
    // A plain loop: memmove calls cost more than they save on runs of a few ids.
    for (int64_t pos = bounds[mb]; pos < bounds[mb + 1]; ++pos) plan->group_ids_N.push_back(order[pos]);
    plan->offsets_M1.push_back(static_cast<int64_t>(plan->group_ids_N.size()));
    plan->epochs_M.push_back(epoch);
  }
}

// Id is uint32_t when G < 2^32: the shuffled array is half the size, which keeps
// more of the random swaps in cache.
template <typename Id>
Plan build_plan(const Options& o, const int64_t* max_len, const int64_t* total_len,
                const int64_t* seq_lens, int64_t G) {
  Plan plan;
  plan.group_ids_N.reserve(static_cast<size_t>(G / o.dp_size + 1) * o.num_epochs);
  std::vector<Id> ids(G);
  EpochOrder order{std::vector<int64_t>(G), std::vector<int64_t>(G)};
  // Packed and THD budgets sort largest first: a stable ascending sort on (max - total_len).
  const bool desc = o.packed_budget() || o.thd_budget();
  std::vector<int64_t> desc_key;
  const int64_t top = desc ? *std::max_element(total_len, total_len + G) : 0;
  if (desc) {
    desc_key.resize(G);
    for (int64_t g = 0; g < G; ++g) desc_key[g] = top - total_len[g];
  }
  const int64_t* key = desc ? desc_key.data() : (o.packed || o.thd ? total_len : max_len);
  std::vector<int64_t> packed_order;
  for (int64_t e = 0; e < o.num_epochs; ++e) {
    std::iota(ids.begin(), ids.end(), Id{0});
    SplitMix64 rng(o.seed, static_cast<uint64_t>(e), 0);
    shuffle(ids, rng);
    sort_windows(ids, key, o.window, &order);
    if (o.packed_budget()) {
      const auto bounds = fill_packed(o, max_len, total_len, seq_lens, order.group, &packed_order);
      assign_epoch(o, e, packed_order, bounds, &plan);
      continue;
    }
    if (o.thd_budget()) {
      const auto bounds = fill_thd(o, top, &order);
      assign_epoch(o, e, order.group, bounds, &plan);
      continue;
    }
    int64_t tail_dropped = 0;
    const auto bounds = fill(o, order.key, &tail_dropped);
    plan.dropped_groups += tail_dropped;
    assign_epoch(o, e, order.group, bounds, &plan);
  }
  return plan;
}

// Hands a vector to numpy without copying: the capsule owns the heap copy.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
  auto* owned = new std::vector<int64_t>(std::move(v));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())}, owned->data(), free_when_done);
}

py::tuple plan_microbatches(const py::array& max_len_G, const py::array& total_len_G,
                            const py::array& seq_lens_GS, int64_t seq_length, int64_t seqs_per_group,
                            int64_t num_epochs, uint64_t seed, int64_t dp_rank, int64_t dp_size,
                            int64_t groups_per_microbatch, int64_t token_budget, bool packed,
                            int64_t window, int64_t num_threads, bool thd) {
  const int64_t* max_len = int64_vector(max_len_G, "max_len");
  const int64_t* total_len = int64_vector(total_len_G, "total_len");
  if (max_len_G.size() != total_len_G.size()) {
    std::ostringstream m;
    fail(m << "max_len and total_len must have the same length, got " << max_len_G.size()
           << " and " << total_len_G.size());
  }
  const auto G = static_cast<int64_t>(max_len_G.size());
  const Options o{seqs_per_group, num_epochs,   seed,   dp_rank, dp_size,
                  groups_per_microbatch, token_budget, packed, thd, window,
                  packed && token_budget > 0 ? seq_length : 0, num_threads};
  check_options(o, G);
  const int64_t* seq_lens = nullptr;
  if (o.packed_budget()) {
    std::ostringstream m;
    if (seq_length < 1 || seq_length > kMaxLength)
      fail(m << "packed token budget needs seq_length in [1, 2^40], got " << seq_length);
    if (!seq_lens_GS.dtype().is(py::dtype::of<int64_t>()) || seq_lens_GS.ndim() != 2 ||
        !(seq_lens_GS.flags() & py::array::c_style) || seq_lens_GS.shape(0) != G ||
        seq_lens_GS.shape(1) != seqs_per_group)
      fail(m << "packed token budget needs seq_lens as a C-contiguous int64 array [G, 2P] = [" << G
             << ", " << seqs_per_group << "]");
    seq_lens = static_cast<const int64_t*>(seq_lens_GS.data());
  }
  Plan plan;
  {
    // The input buffers stay alive: the caller holds references to every array. The
    // errors thrown below are plain C++ exceptions until pybind11 translates them, after
    // the GIL is taken back.
    py::gil_scoped_release release;
    check_lengths(o, max_len, total_len, seq_lens, G);
    plan = G < (int64_t{1} << 32) ? build_plan<uint32_t>(o, max_len, total_len, seq_lens, G)
                                  : build_plan<int64_t>(o, max_len, total_len, seq_lens, G);
  }
  return py::make_tuple(to_numpy(std::move(plan.offsets_M1)), to_numpy(std::move(plan.group_ids_N)),
                        to_numpy(std::move(plan.epochs_M)), plan.dropped_groups);
}

py::tuple packed_shape_py(const py::array& seq_lens, int64_t seq_length) {
  const int64_t* lens = int64_vector(seq_lens, "seq_lens");
  const auto n = static_cast<int64_t>(seq_lens.size());
  std::ostringstream m;
  if (n < 1) fail(m << "need at least one sequence length");
  std::vector<int64_t> items(lens, lens + n), free, loads;
  for (int64_t len : items)
    if (len < 1 || len > seq_length)
      fail(m << "sequence lengths must be in [1, seq_length=" << seq_length << "], got " << len);
  std::sort(items.begin(), items.end(), std::greater<int64_t>());
  const auto shape = packed_shape(items.data(), n, seq_length, free, loads);
  return py::make_tuple(shape.first, shape.second);
}

// Whether the ROW RULE lays seq_lens out in R * W <= budget, by fits_budget (the planner's
// test, with its lower bounds); tests compare it with packed_shape.
bool packed_fits_py(const py::array& seq_lens, int64_t seq_length, int64_t budget) {
  const int64_t* lens = int64_vector(seq_lens, "seq_lens");
  const auto n = static_cast<int64_t>(seq_lens.size());
  std::ostringstream m;
  if (n < 1) fail(m << "need at least one sequence length");
  if (budget < 1 || budget > kMaxBudget) fail(m << "budget must be in [1, 2^62], got " << budget);
  if (seq_length < 1 || seq_length > kMaxLength)
    fail(m << "seq_length must be in [1, 2^40], got " << seq_length);
  std::vector<int64_t> items(lens, lens + n), free, loads;
  int64_t total = 0;
  for (int64_t len : items) {
    if (len < 1 || len > seq_length)
      fail(m << "sequence lengths must be in [1, seq_length=" << seq_length << "], got " << len);
    total += len;
  }
  if (total > budget) return false;  // fits_budget's callers check the tokens first
  std::sort(items.begin(), items.end(), std::greater<int64_t>());
  return fits_budget(items.data(), n, total, seq_length, budget, 1, free, loads);
}

}  // namespace

PYBIND11_MODULE(_indexer, m) {
  m.doc() = "C++ micro-batch planner for AMoPO groups; see megatron_amopo.data.indexer.";
  m.def("plan_microbatches", &plan_microbatches, py::arg("max_len"), py::arg("total_len"),
        py::arg("seq_lens"), py::arg("seq_length"), py::arg("seqs_per_group"), py::arg("num_epochs"), py::arg("seed"), py::arg("dp_rank"),
        py::arg("dp_size"), py::arg("groups_per_microbatch"), py::arg("token_budget"),
        py::arg("packed"), py::arg("window"), py::arg("num_threads") = 1, py::arg("thd") = false,
        "Plan one rank's micro-batches. Returns (offsets[M+1], group_ids[N], epochs[M], "
        "dropped_groups). Exactly one of groups_per_microbatch / token_budget is > 0; a packed "
        "token budget also needs seq_lens [G, 2P] int64 and seq_length (else pass an empty array, "
        "0). thd=True (not with packed) charges a micro-batch the sum of its groups' total_len. "
        "Packed and THD budgets plan their windows on num_threads threads (the same plan for "
        "any number).");
  m.def("packed_shape", &packed_shape_py, py::arg("seq_lens"), py::arg("seq_length"),
        "(rows, width) of the packed layout (the ROW RULE) of the 1-D int64 seq_lens.");
  m.def("packed_fits", &packed_fits_py, py::arg("seq_lens"), py::arg("seq_length"), py::arg("budget"),
        "Whether rows * width of the packed layout of seq_lens is <= budget, by the planner's "
        "test (lower bounds first, the ROW RULE only where they allow it).");
}
