"""The renderer: any region of a synthetic slide at any downsample, from its fields and seed.

Procedural texture is H&E as stain concentrations (nuclei, stroma fibres, fat cells, tumour
sheets) turned into RGB by Beer-Lambert; with real tiles the tissue is their mosaic instead.
Pen ink is laid on top. Fine texture fades where pixels are too coarse to show it.
"""

from __future__ import annotations

import numpy as np

from nic_pipeline.synth.fields import Fields, sample_fields
from nic_pipeline.synth.noise import blob_layer, smoothstep, stream_key, value_noise, voronoi
from nic_pipeline.synth.stain import EOSIN, HEMATOXYLIN, restain, restain_matrix, stain_scales
from nic_pipeline.synth.tiles import TilePools

BACKGROUND_RGB = (241.0, 239.0, 243.0)


class Renderer:
    """Renders any region of the slide at any downsample from the fields and the seed."""

    def __init__(self, fields: Fields, width, height, mpp, seed, tiles: TilePools | None = None,
                 stain_jitter: float = 0.0):
        self.fields = fields
        self.stack = fields.stack()
        self.width, self.height, self.mpp, self.seed = width, height, mpp, seed
        self.key = stream_key(seed, 2)
        self.tiles = tiles
        rng = np.random.default_rng([seed, 104729])
        # per-slide stain variation (hue and strength), as between labs/batches; --stain-jitter adds more
        scales = stain_scales(seed, stain_jitter)
        self.h_vec = (HEMATOXYLIN * rng.uniform(0.85, 1.15, 3)).astype(np.float32) * scales[0]
        self.e_vec = (EOSIN * rng.uniform(0.85, 1.15, 3)).astype(np.float32) * scales[1]
        self.h_gain = np.float32(rng.uniform(0.85, 1.15))
        self.e_gain = np.float32(rng.uniform(0.8, 1.2))
        self.bg_od = (-np.log(np.array(BACKGROUND_RGB, np.float32) / 255)).astype(np.float32)
        self.restain = restain_matrix(scales) if stain_jitter else None

    # -- helpers
    def _noise(self, px_um, ys_um, xs_um, spacing, salt):
        """Value noise at this spacing (µm), or 0 where pixels of px_um are too coarse to show it."""
        if spacing < 1.5 * px_um:
            return np.float32(0)
        return value_noise(ys_um, xs_um, spacing, self.key + np.uint64(salt))

    def background(self, h, w) -> np.ndarray:
        """An (h, w, 3) uint8 view of bare glass."""
        return np.broadcast_to(np.array(BACKGROUND_RGB, np.uint8), (h, w, 3))

    def render(self, y0: int, x0: int, h: int, w: int, d: int) -> np.ndarray:
        """(h, w, 3) uint8 of the region whose top-left is (y0, x0) in level-d pixels."""
        ys0 = (y0 + np.arange(h) + 0.5) * d          # level-0 px of pixel centres
        xs0 = (x0 + np.arange(w) + 0.5) * d
        fl = sample_fields(self.stack, ys0, xs0)
        pen = fl[5]
        if fl[0].max() < -40 and pen.max() <= 0:
            return np.array(self.background(h, w))
        mpp = self.mpp
        ys, xs = ys0 * mpp, xs0 * mpp                # µm
        px_um = d * mpp
        edge_um = max(1.5, 0.7 * px_um)
        ragged = 5.0 * self._noise(px_um, ys, xs, 12.0, 1)
        tissue_a = np.clip((fl[0] + ragged) / edge_um + 0.5, 0, 1)
        lesion_sd = fl[1] + 10.0 * self._noise(px_um, ys, xs, 25.0, 2)
        lesion_a = np.clip(lesion_sd / edge_um + 0.5, 0, 1) * tissue_a
        if self.tiles is not None:
            rgb = self._render_tiles(ys0, xs0, d, tissue_a, lesion_a)
        else:
            rgb = self._render_he(ys, xs, px_um, fl, tissue_a, lesion_a)
        if pen.max() > 0:
            ink = pen * (0.75 + 0.25 * self._noise(px_um, ys, xs, 40.0, 3))
            rgb = rgb * np.exp(-ink[..., None] * self.fields.pen_color)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    def _render_he(self, ys, xs, px_um, fl, tissue_a, lesion_a):
        """Procedural H&E as stain concentrations -> Beer-Lambert RGB (float)."""
        fat_w, lymph_w, stain, fold = fl[2], fl[3], fl[4], fl[6]
        detail = min(1.0, 1.2 / px_um)               # fine texture fades at coarse levels
        # domain warp so nuclei do not sit on a visible grid
        ys32, xs32 = ys.astype(np.float32), xs.astype(np.float32)
        wy = ys32[:, None] + 4.0 * self._noise(px_um, ys, xs, 18.0, 10)
        wx = xs32[None, :] + 4.0 * self._noise(px_um, ys, xs, 18.0, 11)
        edge_um = max(0.6, 0.7 * px_um)
        # stroma: wavy eosinophilic fibres
        warp = (70.0 * self._noise(px_um, ys, xs, 160.0, 12) + 25.0 * self._noise(px_um, ys, xs, 45.0, 15)
                + 5.0 * self._noise(px_um, ys, xs, 14.0, 13))
        fib = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi / 7.0) * (ys32[:, None] + warp))
        gaps = smoothstep((self._noise(px_um, ys, xs, 11.0, 14) + 0.5 * self._noise(px_um, ys, xs, 5.0, 16) + 0.7) * 2.0)
        e = (0.42 + 0.38 * (1 - detail * 0.6 * (1 - fib))) * (0.7 + 0.3 * (gaps * detail + (1 - detail) * 0.8))
        e *= 0.85 + 0.15 * self._noise(px_um, ys, xs, 300.0, 19)
        hcon = np.full_like(e, 0.07)
        # fibroblast nuclei (elongated, sparse) and lymphocytes (small, round, dark)
        cov, dark = blob_layer(wy, wx, 14.0, self.key + np.uint64(100), (2.2, 3.0), (2.5, 4.0), 0.35, edge_um)
        hcon += cov * 1.1 * dark
        e *= 1 - 0.4 * cov
        lym_presence = 0.08 + 0.85 * lymph_w
        cov, dark = blob_layer(wy, wx, 8.5, self.key + np.uint64(200), (2.6, 3.3), (1.0, 1.25), lym_presence, edge_um)
        hcon += cov * 1.6 * dark
        e *= 1 - 0.6 * cov
        # fat: polygonal clear adipocytes (Voronoi cells) with thin pink septa
        if fat_w.max() > 0.02:
            fy = wy + 12.0 * self._noise(px_um, ys, xs, 90.0, 17)
            fx = wx + 12.0 * self._noise(px_um, ys, xs, 90.0, 18)
            border, u = voronoi(fy, fx, 75.0, self.key + np.uint64(300))
            clear = (u < fat_w) * smoothstep((border - 1.2) / max(1.0, px_um))
            e *= 1 - 0.95 * clear
            hcon *= 1 - 0.95 * clear
        # tumour: sheets of large, crowded, pleomorphic, hyperchromatic nuclei
        if lesion_a.max() > 0:
            ecyt = 0.42 + 0.08 * self._noise(px_um, ys, xs, 30.0, 20)
            hcyt = np.full_like(ecyt, 0.28)
            cov, dark = blob_layer(wy, wx, 12.0, self.key + np.uint64(400), (3.6, 5.6), (1.0, 1.7), 0.9, edge_um, (0.8, 1.35))
            chrom = 0.8 + 0.4 * detail * self._noise(px_um, ys, xs, 1.2, 21)
            hcyt += cov * 1.55 * dark * chrom
            ecyt *= 1 - 0.5 * cov
            cov2, dark2 = blob_layer(wy + 5.0, wx + 5.0, 12.0, self.key + np.uint64(450), (3.4, 5.0), (1.0, 1.6), 0.35, edge_um, (0.8, 1.3))
            hcyt = np.maximum(hcyt, 0.28 + cov2 * 1.45 * dark2 * chrom)
            e = e * (1 - lesion_a) + ecyt * lesion_a
            hcon = hcon * (1 - lesion_a) + hcyt * lesion_a
        thick = tissue_a * stain * (1 + 0.9 * fold)
        hcon *= thick * self.h_gain
        e *= thick * self.e_gain
        od = hcon[..., None] * self.h_vec + e[..., None] * self.e_vec + self.bg_od
        return 255.0 * np.exp(-od)

    def _render_tiles(self, ys0, xs0, d, tissue_a, lesion_a):
        """Real-tile mosaics (lesion over normal) blended onto glass by the tissue alpha (float RGB)."""
        pools = self.tiles
        bg = np.array(BACKGROUND_RGB, np.float32)
        rgb = np.empty((len(ys0), len(xs0), 3), np.float32)
        rgb[:] = bg
        if tissue_a.max() > 0:
            normal = pools.mosaic("normal", ys0, xs0, d, self.key + np.uint64(1000))
            if lesion_a.max() > 0:
                lesion = pools.mosaic("lesion", ys0, xs0, d, self.key + np.uint64(2000))
                normal += lesion_a[..., None] * (lesion - normal)
            if self.restain is not None:
                normal = restain(normal, self.restain)
            rgb += tissue_a[..., None] * (normal - bg)
        return rgb
