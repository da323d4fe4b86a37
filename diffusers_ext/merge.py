"""Token merging on an image grid (ToMe for SD, Bolya & Hoffman 2023), as AgentSD uses it.

Bipartite soft matching: one *destination* token per `stride x stride` cell of the grid (the
top-left one, or a random one per cell drawn from a caller's generator), every other token is a
*source*. Each source finds its most cosine-similar destination; the `r` most similar sources are
averaged into their destination, the rest stay. `merge` shrinks (B, N, C) to (B, N - r, C),
`unmerge` copies each merged token's value back to every position it came from, and `agents`
is AgentSD's second merge of the same matching with its own count: the `a` most similar sources
averaged into their destinations, the other sources kept, (B, N - a, C) agent tokens (with every
source merged, one agent per cell).

The matching may come from other tokens than the ones merged (AgentSD matches on the transformer
block's input and merges its normalised copy). Similarities are computed in at least fp32; fp64
stays fp64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import upcast_dtype

# Rows of the (sources x destinations) similarity matrix computed at once: bounds the memory of
# the matching at large grids (2048^2 images have 65,536 tokens at the UNet's first level).
_MATCH_CHUNK_ELEMENTS = 1 << 24


def destination_positions(grid: tuple[int, int], stride: int, generator: torch.Generator | None,
                          device: torch.device) -> torch.Tensor:
    """Flat positions (Nd,) of one destination per full `stride x stride` cell, cells row-major."""
    height, width = grid
    cells_h, cells_w = height // stride, width // stride
    if generator is None:
        offset = torch.zeros(cells_h, cells_w, dtype=torch.long)
    else:
        offset = torch.randint(stride * stride, (cells_h, cells_w), generator=generator, device=generator.device)
        offset = offset.cpu()
    rows = torch.arange(cells_h)[:, None] * stride + offset // stride
    cols = torch.arange(cells_w)[None, :] * stride + offset % stride
    return (rows * width + cols).reshape(-1).to(device)


@torch.no_grad()
def _best_destination(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source row: (cosine similarity to its best destination, that destination's index)."""
    src = src / src.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dst = dst / dst.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    chunk = max(1, _MATCH_CHUNK_ELEMENTS // max(1, dst.shape[1]))
    best, index = [], []
    for start in range(0, src.shape[1], chunk):
        scores = src[:, start:start + chunk] @ dst.transpose(1, 2)
        value, arg = scores.max(dim=-1)
        best.append(value)
        index.append(arg)
    return torch.cat(best, dim=1), torch.cat(index, dim=1)


@dataclass
class GridMerge:
    """The result of matching; index tensors are (B, ·) except the positions (·,)."""

    num_tokens: int
    src_pos: torch.Tensor   # (Ns,) grid positions of the sources
    dst_pos: torch.Tensor   # (Nd,) grid positions of the destinations
    assign: torch.Tensor    # (B, Ns) best destination of every source
    order: torch.Tensor     # (B, Ns) sources by decreasing similarity to their destination
    num_merged: int         # r: the first r sources of `order` are merged, the rest stay

    @property
    def kept(self) -> torch.Tensor:
        """(B, Ns - r) sources that stay."""
        return self.order[:, self.num_merged:]

    @property
    def merged(self) -> torch.Tensor:
        """(B, r) sources averaged into their destination."""
        return self.order[:, :self.num_merged]

    def num_agents(self, ratio: float) -> int:
        """How many agent tokens `agents(x, ratio)` gives: N - a, a = min(int(ratio N), Ns)."""
        return self.num_tokens - min(int(ratio * self.num_tokens), self.src_pos.numel())

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): kept sources, then destinations averaged with their merged sources."""
        channels = x.shape[-1]
        src, dst = x[:, self.src_pos], x[:, self.dst_pos]
        kept = src.gather(1, self.kept[..., None].expand(-1, -1, channels))
        merged = src.gather(1, self.merged[..., None].expand(-1, -1, channels))
        target = self.assign.gather(1, self.merged)[..., None].expand(-1, -1, channels)
        dst = dst.scatter_reduce(1, target, merged, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every position takes the value of the token it was merged into."""
        return y.gather(1, self._source_rows()[..., None].expand(-1, -1, y.shape[-1]))

    def agents(self, x: torch.Tensor, ratio: float) -> torch.Tensor:
        """(B, N, C) -> (B, N - a, C), a = min(int(ratio N), Ns) (AgentSD's `agent_ratio`): the
        sources after the first a of `order`, then each destination averaged with those of the first
        a matched to it. With every source merged (a = Ns): (B, Nd, C), one agent per cell."""
        channels = x.shape[-1]
        merged = self.num_tokens - self.num_agents(ratio)
        every = merged == self.src_pos.numel()
        src, dst = x[:, self.src_pos], x[:, self.dst_pos]
        if every:
            chosen_src, target = src, self.assign
        else:
            chosen = self.order[:, :merged]
            chosen_src = src.gather(1, chosen[..., None].expand(-1, -1, channels))
            target = self.assign.gather(1, chosen)
        dst = dst.scatter_reduce(1, target[..., None].expand(-1, -1, channels), chosen_src, reduce="mean",
                                 include_self=True)
        if every:
            return dst
        rest = src.gather(1, self.order[:, merged:, None].expand(-1, -1, channels))
        return torch.cat([rest, dst], dim=1)

    def _source_rows(self) -> torch.Tensor:
        """(B, N): for every grid position, its row in the merged sequence."""
        batch, num_kept = self.kept.shape
        rows = torch.empty(batch, self.num_tokens, dtype=torch.long, device=self.kept.device)
        dst_rows = num_kept + torch.arange(self.dst_pos.numel(), device=rows.device)
        rows[:, self.dst_pos] = dst_rows
        src_rows = torch.empty_like(self.assign)
        src_rows.scatter_(1, self.kept, torch.arange(num_kept, device=rows.device).expand(batch, -1))
        src_rows.scatter_(1, self.merged, num_kept + self.assign.gather(1, self.merged))
        rows[:, self.src_pos] = src_rows
        return rows


def match_on_grid(metric: torch.Tensor, grid: tuple[int, int], stride: int, ratio: float,
                  generator: torch.Generator | None = None) -> GridMerge | None:
    """Bipartite soft matching of tokens `metric` (B, N, C) laid out on `grid` (N = H*W).

    Merges `r = int(ratio * N)` sources (at most all of them); None when the grid has no full cell.
    """
    batch, num_tokens, _ = metric.shape
    height, width = grid
    if height * width != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not fill a {height} x {width} grid")
    if height < stride or width < stride:
        return None
    device = metric.device
    dst_pos = destination_positions(grid, stride, generator, device)
    is_dst = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    is_dst[dst_pos] = True
    src_pos = (~is_dst).nonzero().squeeze(1)

    dtype = upcast_dtype(metric.dtype)
    similarity, assign = _best_destination(metric[:, src_pos].to(dtype), metric[:, dst_pos].to(dtype))
    order = similarity.argsort(dim=1, descending=True)
    r = min(int(ratio * num_tokens), src_pos.numel())
    return GridMerge(num_tokens, src_pos, dst_pos, assign, order, r)
