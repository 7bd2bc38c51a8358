// The epoch planner: which groups form each micro-batch and which DP rank gets it, over all
// epochs (algorithm: docs/PLANNER.md; pure-Python reference: megatron_amopo/testing/planner_reference.py).
#pragma once

#include <cstdint>
#include <vector>

namespace amopo {

// The wrapper megatron_amopo/data/planner.py validates every field; the planner trusts them.
struct PlanOptions {
  int64_t seqs_per_group;         // 2P
  int64_t num_epochs;
  uint64_t seed;
  int64_t dp_rank;
  int64_t dp_size;
  int64_t groups_per_microbatch;  // > 0: fixed k; 0: token budget
  int64_t token_budget;           // > 0: token budget; 0: fixed k
  bool packed;                    // cost="packed": windows sorted by total_len
  bool thd;                       // cost="thd": a micro-batch costs its total_len; not with packed
  int64_t window;
  int64_t seq_length;             // S, packed token budget only
  int64_t num_threads;            // packed or THD token budget: threads planning windows
  bool packed_budget() const { return packed && token_budget > 0; }
  bool thd_budget() const { return thd && token_budget > 0; }
};

// One rank's micro-batches: micro-batch m is group_ids[offsets[m] .. offsets[m + 1]).
struct Plan {
  std::vector<int64_t> offsets{0};
  std::vector<int64_t> group_ids;
  std::vector<int64_t> epochs;
  int64_t dropped_groups = 0;
};

// max_len, total_len: [G]; seq_lens: [G, 2P] for a packed token budget, else unused.
Plan plan_microbatches(const PlanOptions& o, const int64_t* max_len, const int64_t* total_len,
                       const int64_t* seq_lens, int64_t G);

}  // namespace amopo
