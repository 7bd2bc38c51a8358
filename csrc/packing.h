// The ROW RULE (twin of megatron_amopo/data/packing.py) and the planner's fit test built on it;
// rule, bounds and proofs: docs/PLANNER.md. Lengths are positive and at most seq_length.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace amopo {

// First index i of a[0..size) with !before(a[i]), where before holds on a prefix of a.
// Branchless: on a few dozen values unpredictable branches cost more than the extra steps.
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

// src[0..n) sorted longest first into out[0..n).
void sort_lengths(const int64_t* src, int64_t n, int64_t* out);

// (R, W) of the ROW RULE for items[0..n) (n >= 1, non-increasing); free and loads are scratch.
std::pair<int64_t, int64_t> packed_shape(const int64_t* items, int64_t n, int64_t seq_length,
                                         std::vector<int64_t>& free, std::vector<int64_t>& loads);

// Whether the ROW RULE lays items[0..n) (non-increasing, summing to total <= budget) out in
// R * W <= budget, rejecting most row counts by lower bounds first. rows_at_least: a lower
// bound on R the caller knows (1 if none).
bool fits_budget(const int64_t* items, int64_t n, int64_t total, int64_t seq_length, int64_t budget,
                 int64_t rows_at_least, std::vector<int64_t>& free, std::vector<int64_t>& loads);

}  // namespace amopo
