// How the CUDA kernels cut tensors into tiles, the unit of work of one warp. Pure
// integer math, usable on the host (launchers size their grids with it; the host
// test tests/cuda/tiles_test.cu checks every element is visited once, in the right
// channel, with aligned vectors) and on the device (kernels decode a tile index).
//
// A tensor is viewed as [outer, channels, inner] (launchers.h: Layout). Two layouts:
//   - rows: inner > 1, or one channel (per-tensor). A row is `inner` contiguous
//     elements of one channel; a tile is a piece of one row, so its quantization
//     parameters are constant. Lanes walk the tile in 16-byte vectors.
//   - columns: several channels and inner == 1 (per-channel along the last axis),
//     where the channel changes every element. A tile is up to 32 consecutive
//     channels x up to `tile_len` rows; lane l owns channel first + l for all the
//     tile's rows, so its parameters are still computed once per tile.
// Several tensors (a whole model for aggregate) form one packed space: tensor t's
// tiles are numbered from tile_base, its elements from element_base in the packed
// output and its channels from segment_base in the packed parameters.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FEDHQ_TILE_HD __host__ __device__ __forceinline__
#else
#define FEDHQ_TILE_HD inline
#endif

namespace fedhq::cuda {

constexpr int kWarp = 32;

struct TensorDesc {
  int64_t numel;
  int64_t channels;
  int64_t inner;
  int64_t element_base;  // packed index of element 0 (0 for single-tensor ops)
  int64_t segment_base;  // packed index of channel 0's parameters
  int64_t tile_base;     // packed index of the first tile
  int64_t tiles;         // this tensor's tiles (0 when empty)
  int64_t tile_len;      // rows: elements per tile; columns: rows per tile
  int64_t per_row;       // rows: tiles per row; columns: groups of kWarp channels
  int32_t columns;       // 1 for the column layout
  int32_t vectors;       // aggregate only: 16-element vectors allowed (aggregate_write_table)
};

struct Tile {
  int64_t begin;    // first element, relative to the tensor
  int64_t len;      // rows: elements; columns: rows
  int64_t channel;  // rows: the tile's channel; columns: the first channel of the group
  int32_t width;    // columns: channels in the group (<= kWarp); rows: 0
};

FEDHQ_TILE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FEDHQ_TILE_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FEDHQ_TILE_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// `tile_elems`: elements per tile in the row layout (a multiple of every vector width
// used on the tensor); the column layout takes tile_elems / kWarp rows per tile.
FEDHQ_TILE_HD TensorDesc make_desc(int64_t numel, int64_t channels, int64_t inner, int64_t tile_elems,
                                   int64_t element_base = 0, int64_t segment_base = 0, int64_t tile_base = 0) {
  TensorDesc d{};
  d.numel = numel;
  d.channels = channels;
  d.inner = inner;
  d.element_base = element_base;
  d.segment_base = segment_base;
  d.tile_base = tile_base;
  d.columns = channels > 1 && inner == 1;
  if (numel <= 0) return d;  // no tiles: its parameters are still observed (as an empty range)
  if (d.columns) {
    d.tile_len = max64(1, tile_elems / kWarp);
    d.per_row = ceil_div(channels, kWarp);
    d.tiles = d.per_row * ceil_div(numel / channels, d.tile_len);
  } else {
    d.tile_len = tile_elems;
    d.per_row = ceil_div(inner, tile_elems);
    d.tiles = (numel / inner) * d.per_row;
  }
  return d;
}

// Tile i (0 <= i < d.tiles) of the tensor.
FEDHQ_TILE_HD Tile tile_at(const TensorDesc& d, int64_t i) {
  if (d.columns) {
    const int64_t group = i % d.per_row, chunk = i / d.per_row;
    const int64_t first = group * kWarp, row = chunk * d.tile_len;
    return Tile{row * d.channels + first, min64(d.tile_len, d.numel / d.channels - row), first,
                int32_t(min64(kWarp, d.channels - first))};
  }
  const int64_t row = i / d.per_row, offset = (i % d.per_row) * d.tile_len;
  return Tile{row * d.inner + offset, min64(d.tile_len, d.inner - offset), row % d.channels, 0};
}

// A row tile [begin, end) split for vectors of n elements: [begin, body) and
// [body_end, end) are the unaligned head and tail (fewer than n elements each),
// [body, body_end) whole vectors whose first element index is a multiple of n.
struct RowSplit {
  int64_t body;
  int64_t body_end;
};

FEDHQ_TILE_HD RowSplit split_row(int64_t begin, int64_t len, int64_t n) {
  const int64_t end = begin + len;
  const int64_t body = min64(end, ceil_div(begin, n) * n);
  return RowSplit{body, body + (end - body) / n * n};
}

// The tensor holding packed tile `tile` (or packed segment, with `segment`): the last
// one whose base is <= the index. Tensors without tiles (or channels) share their
// base with the next tensor and sort before it, so they are never returned for an
// index they do not own.
FEDHQ_TILE_HD int64_t find_tensor(const TensorDesc* descs, int64_t count, int64_t index, bool segment) {
  int64_t lo = 0, hi = count;  // first tensor whose base is > index lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    const int64_t base = segment ? descs[mid].segment_base : descs[mid].tile_base;
    if (base <= index) lo = mid + 1;
    else hi = mid;
  }
  return lo - 1;
}

}  // namespace fedhq::cuda
