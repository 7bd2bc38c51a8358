// The ROW RULE and the planner's fit test (docs/PLANNER.md, "The row rule" and "Fit test").
#include "packing.h"

#include <algorithm>
#include <functional>

namespace amopo {
namespace {

// Best fit decreasing: each of items[0..n) (non-increasing) into the row with the least free
// space that holds it, else a new row of seq_length. free: the rows' free space, ascending (a
// multiset). False as soon as more than max_rows rows would be needed.
bool best_fit(std::vector<int64_t>& free, const int64_t* items, int64_t n, int64_t seq_length,
              int64_t max_rows) {
  // Items over seq_length / 2 come first and open a row each; their free space is ascending.
  int64_t i = partition_index(items, n, [&](int64_t len) { return 2 * len > seq_length; });
  if (i > max_rows) return false;
  free.resize(i);
  for (int64_t r = 0; r < i; ++r) free[r] = seq_length - items[r];
  for (; i < n; ++i) {
    const int64_t len = items[i];
    int64_t* f = free.data();
    auto size = static_cast<int64_t>(free.size());
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
    // Insert after equal values (Python's insort) by a plain loop: memmove costs more here.
    const int64_t j = partition_index(f, at, [&](int64_t room) { return room <= left; });
    for (int64_t r = at; r > j; --r) f[r] = f[r - 1];
    f[j] = left;
  }
  return true;
}

// Longest-processing-time: items[0..n) (non-increasing) each into the least-loaded of `rows`
// rows (loads: a binary min-heap); the fullest row, or a value above cap once a row passes cap.
int64_t balanced_width(const int64_t* items, int64_t n, int64_t rows, int64_t cap,
                       std::vector<int64_t>& loads) {
  if (items[0] > cap) return items[0];
  if (n <= rows) return items[0];  // one sequence per row
  loads.resize(rows);
  int64_t* l = loads.data();
  for (int64_t r = 0; r < rows; ++r) l[r] = items[rows - 1 - r];  // ascending: a valid heap
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

// Martello and Toth's bin-packing lower bound L2 (Discrete Applied Mathematics 28(1), 1990,
// 59-70): false only if items[0..n) (items[0] <= cap) fit in no packing into `rows` rows of cap.
bool may_fit_rows(const int64_t* items, int64_t n, int64_t total, int64_t cap, int64_t rows) {
  if (total > rows * cap) return false;  // rows * cap <= budget < 2^63
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

// Lower bounds that every packing into `rows` rows of W <= min(S, budget / rows) obeys.
bool rows_may_fit(const int64_t* items, int64_t n, int64_t total, int64_t rows, int64_t seq_length,
                  int64_t budget) {
  const int64_t cap = std::min(seq_length, budget / rows);
  if (items[0] > cap) return false;
  if (n > rows && items[rows - 1] + items[rows] > cap) return false;
  if (n > 2 * rows && items[2 * rows - 2] + items[2 * rows - 1] + items[2 * rows] > cap) return false;
  return may_fit_rows(items, n, total, cap, rows);
}

}  // namespace

void sort_lengths(const int64_t* src, int64_t n, int64_t* out) {
  if (n > 32) {
    std::copy(src, src + n, out);
    std::sort(out, out + n, std::greater<int64_t>());
    return;
  }
  for (int64_t i = 0; i < n; ++i) {  // insertion sort: a group holds a few sequences
    const int64_t v = src[i];
    int64_t j = i;
    while (j > 0 && out[j - 1] < v) {
      out[j] = out[j - 1];
      --j;
    }
    out[j] = v;
  }
}

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

}  // namespace amopo
