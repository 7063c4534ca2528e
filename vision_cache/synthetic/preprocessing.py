"""How many embedding tokens mtmd makes of an image: its preprocessors, ported.

Mirrors tools/mtmd/mtmd-image.cpp at the pinned llama.cpp (float32 arithmetic where the C++
uses floats, so rounding agrees at the edges). Counts are image tokens only, summed over an
image's chunks: the text mtmd puts between tiles (row/column markers, ``<slice>``) is not
counted, which is what a visual package holds. Families call these from
`Family.expected_image_tokens`; tests compare them with what the real server does.
"""

from __future__ import annotations

import math

import numpy as np

_F32 = np.float32


def _round_half_away(x: float) -> int:
    """std::round."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def preserved_ratio(
    width: int, height: int, align: int, min_pixels: int, max_pixels: int, longest_edge: int = 0
) -> tuple[int, int]:
    """``img_tool::calc_size_preserved_ratio``: sides aligned to `align`, area in bounds."""

    def by(x: np.float32, rounding: str) -> int:
        q = float(_F32(x) / _F32(align))
        n = {"round": _round_half_away(q), "ceil": math.ceil(q), "floor": math.floor(q)}
        return int(n[rounding]) * align

    if longest_edge > 0:
        scale = min(_F32(longest_edge) / _F32(width), _F32(longest_edge) / _F32(height))
        w_bar, h_bar = by(_F32(width) * scale, "ceil"), by(_F32(height) * scale, "ceil")
    else:
        w_bar = max(align, by(_F32(width), "round"))
        h_bar = max(align, by(_F32(height), "round"))
    if 0 < max_pixels < h_bar * w_bar:
        beta = np.sqrt(_F32(height) * _F32(width) / _F32(max_pixels), dtype=_F32)
        h_bar = max(align, by(_F32(height) / beta, "floor"))
        w_bar = max(align, by(_F32(width) / beta, "floor"))
    elif min_pixels > 0 and h_bar * w_bar < min_pixels:
        beta = np.sqrt(_F32(min_pixels) / (_F32(height) * _F32(width)), dtype=_F32)
        h_bar = by(_F32(height) * beta, "ceil")
        w_bar = by(_F32(width) * beta, "ceil")
    return w_bar, h_bar


def dynamic_grid(
    width: int, height: int, align: int, min_tokens: int, max_tokens: int
) -> tuple[int, int]:
    """Token columns and rows of the dynamic-resolution preprocessor (Qwen-VL and others):
    one token per `align` x `align` pixels, between `min_tokens` and `max_tokens`."""
    area = align * align
    w, h = preserved_ratio(width, height, align, min_tokens * area, max_tokens * area)
    return w // align, h // align


def _fit_keeping_ratio(w: int, h: int, tw: int, th: int) -> tuple[int, int]:
    scale = min(_F32(tw) / _F32(w), _F32(th) / _F32(h))
    return int(_F32(w) * scale), int(_F32(h) * scale)


def best_resolution(w: int, h: int, candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """``select_best_resolution``: the candidate keeping most pixels, then wasting least."""
    best, min_wasted, max_effective = (0, 0), 2**31 - 1, 0
    for cw, ch in candidates:
        tw, th = _fit_keeping_ratio(w, h, cw, ch)
        effective = min(tw * th, w * h)
        wasted = cw * ch - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (cw, ch)
    return best


def pinpoint_tiles(w: int, h: int, tile: int, candidates: list[tuple[int, int]]) -> int:
    """Tiles of the llava-uhd preprocessor with candidate resolutions (InternVL, Llama 4);
    0 when the image fits one tile (then only the overview is encoded)."""
    if w <= tile and h <= tile:
        return 0
    rw, rh = best_resolution(w, h, candidates)
    return (rw // tile) * (rh // tile)


def internvl_candidates(tile: int, min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """``set_internvl_dhr_res_candidates``."""
    out = []
    for a in range(min_tiles, max_tiles + 1):
        b_lo = max((min_tiles + a - 1) // a, min_tiles)
        for b in range(b_lo, min(max_tiles // a, max_tiles) + 1):
            out.append((a * tile, b * tile))
    return out


def grid_candidates(tile: int, per_side: int) -> list[tuple[int, int]]:
    """``set_llava_uhd_res_candidates``: every grid up to `per_side` tiles a side but 1x1."""
    return [
        (x * tile, y * tile)
        for x in range(1, per_side + 1)
        for y in range(1, per_side + 1)
        if (x, y) != (1, 1)
    ]


def uhd_slices(w: int, h: int, slice_size: int, max_slices: int = 9) -> int:
    """Slices of the llava-uhd preprocessor without candidates (MiniCPM-V); 0 when the
    image fits one slice."""
    if w <= slice_size and h <= slice_size:
        return 0
    log_ratio = math.log(float(_F32(w) / _F32(h)))
    ratio = float(_F32(w) * _F32(h) / _F32(slice_size * slice_size))
    multiple = min(math.ceil(ratio), max_slices)
    grids = [
        (m, n // m)
        for n in (multiple - 1, multiple, multiple + 1)
        if n != 1 and n <= max_slices
        for m in range(1, n + 1)
        if n % m == 0
    ]
    best, error = (1, 1), math.inf
    for gx, gy in grids:
        e = abs(log_ratio - math.log(gx / gy))
        if e < error:
            best, error = (gx, gy), e
    return best[0] * best[1]


def longest_edge_tiles(w: int, h: int, tile: int, longest_edge: int) -> int:
    """Tiles of the Idefics3 preprocessor: longest side resized to `longest_edge`, then cut
    into `tile`-sized squares (rounding up)."""
    aspect = w / h
    if w >= h:
        rw, rh = longest_edge, int(longest_edge / aspect)
        rh += rh % 2
    else:
        rh, rw = longest_edge, int(longest_edge * aspect)
        rw += rw % 2
    return math.ceil(rw / tile) * math.ceil(rh / tile)


def lfm2_tiles(
    w: int,
    h: int,
    align: int,
    patch: int,
    max_pixels: int,
    *,
    tile: int = 512,
    min_tiles: int = 2,
    max_tiles: int = 10,
) -> tuple[int, int]:
    """LFM2-VL's tile grid (columns, rows), or (0, 0) when the image is encoded whole: it is
    tiled once its aligned area passes twice the pixel budget."""
    h_bar = max(patch, round(h / align) * align)  # std::nearbyint: half to even, as round()
    w_bar = max(patch, round(w / align) * align)
    if h_bar * w_bar <= max_pixels * 2.0:
        return 0, 0
    ratios: list[tuple[int, int]] = []
    for n in range(min_tiles, max_tiles + 1):
        for a in range(1, n + 1):
            for b in range(1, n + 1):
                if min_tiles <= a * b <= max_tiles and (a, b) not in ratios:
                    ratios.append((a, b))
    ratios.sort(key=lambda r: r[0] * r[1])
    aspect = float(_F32(w) / _F32(h))
    best, best_diff = (1, 1), math.inf
    for rw, rh in ratios:
        diff = abs(aspect - float(_F32(rw) / _F32(rh)))
        if diff < best_diff:
            best, best_diff = (rw, rh), diff
        elif diff == best_diff and w * h > 0.5 * tile * tile * rw * rh:
            best = (rw, rh)
    return best
