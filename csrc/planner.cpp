// The epoch planner (docs/PLANNER.md, steps 1-4), mirroring megatron_amopo/testing/planner_reference.py.
#include "planner.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>

#include "packing.h"

namespace amopo {
namespace {

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

// One epoch's order after steps 1-2: group ids and their length keys, window by window.
struct EpochOrder {
  std::vector<int64_t> group;
  std::vector<int64_t> key;
};

struct Keyed {
  int64_t key;
  int64_t group;
};

// Stable LSD radix sort on the key, one byte per pass, as many passes as the largest key needs.
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

// Step 2, fixed k or padded budget (key: max_len): micro-batch bounds into the order, incl. the
// end; a short last fixed-k run is dropped and counted in *tail_dropped.
std::vector<int64_t> fill(const PlanOptions& o, const std::vector<int64_t>& key, int64_t* tail_dropped) {
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

// Merges a[0..na) and b[0..nb) (both non-increasing) into out, placing each b[j] by bisection.
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

// Step 2, packed token budget, for the window order[lo, hi) (largest first): first fit by groups
// under fits_budget. Writes the window's groups to out[lo, hi), setting starts[pos] where a
// micro-batch starts.
void fill_window(const PlanOptions& o, const int64_t* max_len, const int64_t* total_len,
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

// Step 2 window by window on o.num_threads workers (packed, THD budgets): each window writes only
// its own slots of out, so the plan is the same for any thread count. Returns the bounds into out.
template <typename Scratch, typename FillWindow>
std::vector<int64_t> fill_windows(const PlanOptions& o, int64_t G, int64_t* out, const FillWindow& fill) {
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

std::vector<int64_t> fill_packed(const PlanOptions& o, const int64_t* max_len, const int64_t* total_len,
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

// Step 2, THD token budget, for the window order[lo, hi) (largest first): first fit by groups,
// each next group found by a bisection and a union-find jump over taken positions. The window is
// copied to scratch first, so out may be the order itself.
void fill_thd_window(const PlanOptions& o, const EpochOrder& order, int64_t top, int64_t lo, int64_t hi,
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
std::vector<int64_t> fill_thd(const PlanOptions& o, int64_t top, EpochOrder* order) {
  return fill_windows<ThdScratch>(
      o, static_cast<int64_t>(order->group.size()), order->group.data(),
      [&](int64_t lo, int64_t hi, int64_t* dst, char* starts, ThdScratch& s) {
        fill_thd_window(o, *order, top, lo, hi, dst, starts, s);
      });
}

// Steps 3-4 for one epoch: shuffle micro-batches, keep whole rounds of dp_size,
// append this rank's share (micro-batch j goes to rank j % dp_size).
void assign_epoch(const PlanOptions& o, int64_t epoch, const std::vector<int64_t>& order,
                  const std::vector<int64_t>& bounds, Plan* plan) {
  const auto num_mb = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<int64_t> perm(num_mb);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  SplitMix64 rng(o.seed, static_cast<uint64_t>(epoch), 1);
  shuffle(perm, rng);
  const int64_t kept = num_mb - num_mb % o.dp_size;
  for (int64_t j = kept; j < num_mb; ++j) plan->dropped_groups += bounds[perm[j] + 1] - bounds[perm[j]];
  for (int64_t j = o.dp_rank; j < kept; j += o.dp_size) {
    const int64_t mb = perm[j];
    // A plain loop: memmove calls cost more than they save on runs of a few ids.
    for (int64_t pos = bounds[mb]; pos < bounds[mb + 1]; ++pos) plan->group_ids.push_back(order[pos]);
    plan->offsets.push_back(static_cast<int64_t>(plan->group_ids.size()));
    plan->epochs.push_back(epoch);
  }
}

// Id is uint32_t when G < 2^32: the shuffled array is half the size, which keeps
// more of the random swaps in cache.
template <typename Id>
Plan build_plan(const PlanOptions& o, const int64_t* max_len, const int64_t* total_len,
                const int64_t* seq_lens, int64_t G) {
  Plan plan;
  plan.group_ids.reserve(static_cast<size_t>(G / o.dp_size + 1) * o.num_epochs);
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

}  // namespace

Plan plan_microbatches(const PlanOptions& o, const int64_t* max_len, const int64_t* total_len,
                       const int64_t* seq_lens, int64_t G) {
  return G < (int64_t{1} << 32) ? build_plan<uint32_t>(o, max_len, total_len, seq_lens, G)
                                : build_plan<int64_t>(o, max_len, total_len, seq_lens, G);
}

}  // namespace amopo
