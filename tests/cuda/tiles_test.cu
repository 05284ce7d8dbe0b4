// Host test of the CUDA kernels' work decomposition, run by tests/test_cuda.py on a
// machine without a GPU: the same walk_row / walk_column / tile_at / find_tensor /
// aggregate_write_table code the kernels use, executed here for every lane of every
// tile. Checks that every element is visited exactly once, with its own channel's
// parameters, that vectors start at aligned element indices and stay inside the
// tensor, and that packed models are located and described correctly. Prints "ok"
// and exits 0, or prints the first failure and exits 1.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../csrc/cuda/common.cuh"

using namespace fedhq;
using namespace fedhq::cuda;

#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
      std::printf(__VA_ARGS__);                                           \
      std::printf("\n");                                                  \
      std::exit(1);                                                       \
    }                                                                     \
  } while (0)

// Records visits; the channel a tile's walk was given travels in QParams::scale.
template <int kN, int kU>
struct Recorder {
  static constexpr int N = kN, U = kU;
  struct Batch {
    int64_t first;
  };
  bool vec;
  const Layout* layout;
  std::vector<int>* hits;
  int64_t* vectors;

  void visit(int64_t i, const QParams& p) const {
    CHECK(i >= 0 && i < layout->numel, "element %lld outside [0, %lld)", (long long)i, (long long)layout->numel);
    const int64_t channel = (i / layout->inner) % layout->channels;
    CHECK(int64_t(p.scale) == channel, "element %lld of channel %lld walked with channel %lld", (long long)i,
          (long long)channel, (long long)p.scale);
    ++(*hits)[size_t(i)];
  }
  void load(int64_t i, Batch& b) const { b.first = i; }
  void use(int64_t i, const Batch& b, const QParams& p) const {
    CHECK(vec, "vector used while vectors are off");
    CHECK(b.first == i && i % N == 0, "vector at %lld (loaded %lld) not aligned to %d", (long long)i,
          (long long)b.first, N);
    for (int j = 0; j < N; ++j) visit(i + j, p);
    ++*vectors;
  }
  void one(int64_t i, const QParams& p) const { visit(i, p); }
};

QParams channel_params(int64_t c) {
  QParams p{};
  p.scale = float(c);  // exact for the channel counts used here
  return p;
}

template <int N, int U>
void check_layout(Layout l, bool vec, int repeats) {
  const int64_t tile = int64_t(kWarp) * N * U * repeats;
  const TensorDesc d = make_desc(l.numel, l.channels, l.inner, tile);
  std::vector<int> hits(size_t(l.numel), 0);
  int64_t vectors = 0;
  Recorder<N, U> op{vec, &l, &hits, &vectors};
  for (int64_t i = 0; i < d.tiles; ++i) {
    const Tile t = tile_at(d, i);
    CHECK(t.len > 0, "empty tile %lld", (long long)i);
    for (int lane = 0; lane < kWarp; ++lane) {
      if (!d.columns) {
        walk_row(op, t, lane, channel_params(t.channel));
      } else if (lane < t.width) {
        walk_column(op, d, t, lane, channel_params(t.channel + lane));
      }
    }
  }
  for (int64_t i = 0; i < l.numel; ++i)
    CHECK(hits[size_t(i)] == 1, "element %lld visited %d times (numel %lld channels %lld inner %lld N %d vec %d)",
          (long long)i, hits[size_t(i)], (long long)l.numel, (long long)l.channels, (long long)l.inner, N, int(vec));
  // rows long enough for whole vectors are mostly walked in vectors
  if (vec && !d.columns && l.inner >= 64 * N)
    CHECK(vectors * N >= l.numel / 2, "only %lld of %lld elements in vectors", (long long)(vectors * N),
          (long long)l.numel);
}

template <int N, int U>
void check_layouts() {
  const Layout layouts[] = {
      {1, 1, 1},          {7, 1, 7},             {4096, 1, 4096},      {70001, 1, 70001},
      {6 * 5000, 6, 5000}, {4 * 7 * 9, 7, 9},     {3 * 4100, 4100, 1},  {2 * 3 * 11000, 11000, 1},
      {70 * 1100, 70, 1100}, {5, 5, 1},          {16 * 27, 16, 27},    {2 * 64 * 3, 64, 3},
      {10 * 33, 33, 1},   {3 * 4 * 130, 4, 130}, {1000, 1000, 1},      {5 * 2 * 3, 2, 3},
  };
  for (const Layout& l : layouts) {
    for (bool vec : {true, false}) {
      check_layout<N, U>(l, vec, 1);
      check_layout<N, U>(l, vec, 2);
    }
  }
}

void check_order_keys() {
  const float values[] = {-INFINITY, -3e38f, -1.5f, -1e-40f, -0.0f, 0.0f, 1e-45f, 1e-40f, 0.5f, 1.0f, 3e38f, INFINITY};
  const int n = int(sizeof values / sizeof values[0]);
  for (int a = 0; a < n; ++a) {
    CHECK(order_key(values[a]) != 0 && ~order_key(values[a]) != 0, "key of %g is a zero slot", values[a]);
    CHECK(float_bits(key_float(order_key(values[a]))) == float_bits(values[a]), "round trip of %g", values[a]);
    for (int b = a + 1; b < n; ++b)
      CHECK(order_key(values[a]) < order_key(values[b]), "order of %g and %g", values[a], values[b]);
  }
}

void check_status() {
  Status s{};
  CHECK(first_bad_qparam(s) == -1 && first_nonfinite_tensor(s) == -1, "zeroed status");
  s.bad_qparam = ~0ull - 0;  // what flag_bad_qparam stores for index 0
  s.bad_value = 0x7fffffffu - 3;
  CHECK(first_bad_qparam(s) == 0 && first_nonfinite_tensor(s) == 3, "decoded status");
  s.bad_qparam = ~static_cast<unsigned long long>(12345);
  CHECK(first_bad_qparam(s) == 12345, "decoded index");
}

// A packed model with empty tensors, per-tensor, rows and columns layouts.
void check_aggregate_table() {
  const Layout layouts[] = {{0, 1, 1}, {16 * 27, 16, 27}, {0, 0, 1}, {7 * 4200, 4200, 1}, {1, 1, 1}, {70001, 1, 70001},
                            {13, 1, 13}, {10 * 4500, 10, 4500}};
  const int64_t tensors = int64_t(sizeof layouts / sizeof layouts[0]), clients = 3;
  alignas(16) static int8_t storage[64];
  std::vector<AggregateEntry> entries;
  std::vector<EntryRange> ranges;
  for (int64_t k = 0; k < clients; ++k) {
    for (int64_t t = 0; t < tensors; ++t) {  // client 2's tensor 7 is misaligned: no vectors for tensor 7
      entries.push_back(AggregateEntry{storage + ((k == 2 && t == 7) ? 1 : 0), nullptr, nullptr});
      ranges.push_back(EntryRange{-int32_t(k + 2), int32_t(k + t)});
    }
  }
  std::vector<unsigned char> table(aggregate_table_bytes(tensors, clients));
  const AggregatePlan plan =
      aggregate_write_table(table.data(), layouts, tensors, entries.data(), ranges.data(), clients);
  const TensorDesc* descs = reinterpret_cast<const TensorDesc*>(table.data());
  const AggregateEntry* copied = reinterpret_cast<const AggregateEntry*>(descs + tensors);
  const EntryRange* copied_ranges = reinterpret_cast<const EntryRange*>(copied + entries.size());
  int64_t elements = 0, segments = 0, tiles = 0;
  for (int64_t t = 0; t < tensors; ++t) {
    const TensorDesc& d = descs[t];
    CHECK(d.element_base == elements && d.segment_base == segments && d.tile_base == tiles, "bases of tensor %lld",
          (long long)t);
    CHECK(d.vectors == (elements % 16 == 0 && t != 7), "vectors flag of tensor %lld", (long long)t);
    for (int64_t i = 0; i < d.tiles; ++i)
      CHECK(find_tensor(descs, tensors, tiles + i, false) == t, "tile %lld of tensor %lld", (long long)i,
            (long long)t);
    for (int64_t c = 0; c < d.channels; ++c)
      CHECK(find_tensor(descs, tensors, segments + c, true) == t, "segment %lld of tensor %lld", (long long)c,
            (long long)t);
    elements += layouts[t].numel;
    segments += layouts[t].channels;
    tiles += d.tiles;
  }
  CHECK(plan.elements == elements && plan.segments == segments && plan.tiles == tiles && plan.tensors == tensors &&
            plan.clients == clients,
        "plan");
  for (size_t e = 0; e < entries.size(); ++e)  // each entry's own code range travels with it
    CHECK(copied[e].codes == entries[e].codes && copied_ranges[e].qmin == ranges[e].qmin &&
              copied_ranges[e].qmax == ranges[e].qmax,
          "entry %zu", e);
}

int main() {
  check_layouts<4, 4>();   // fake_quant float32
  check_layouts<8, 4>();   // fake_quant float16 / bfloat16
  check_layouts<8, 2>();   // backward 16-bit
  check_layouts<16, 2>();  // quantize
  check_layouts<16, 1>();  // aggregate
  check_order_keys();
  check_status();
  check_aggregate_table();
  std::printf("ok\n");
  return 0;
}
