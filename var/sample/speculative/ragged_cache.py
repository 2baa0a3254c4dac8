"""The KV cache of raster speculative decoding with batch > 1: every row holds its own number of tokens."""

from __future__ import annotations

import torch

from var.models.kv_cache import KVCache


class RaggedKVCache(KVCache):
    """A cache whose rows hold different numbers of tokens (speculative decoding with batch > 1).

    Token t of a row lives in slot t.  Each pass appends a window of ``count`` tokens to every row at that
    row's own length (per-row write offsets); :meth:`open_window` returns the matching attention mask, in
    which a query at slot s sees slots <= s of its own row.  Slots beyond a row's length (stale drafts of a
    rolled-back window, or other rows' longer windows) are therefore never visible, and
    :meth:`truncate` rolls each row back to its own accepted length.  Buffers start zeroed so that masked
    slots never hold NaN.

    Args:
        num_layers: number of attention layers.
        capacity: slots per row (the longest sequence plus one window).
        rows: batch rows (both guidance halves).
    """

    def __init__(self, num_layers: int, capacity: int, rows: int, device: torch.device | str = "cpu"):
        super().__init__(num_layers, capacity)
        self.row_lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots: torch.Tensor | None = None  # (rows, count) where the current window is written
        self.window_end = 0  # one past the last slot of the current window (in any row)

    @property
    def length(self) -> int:
        """The longest row."""
        return int(self.row_lengths.max())

    def open_window(self, count: int) -> torch.Tensor:
        """Reserve ``count`` slots after every row's length; returns the boolean mask (rows, 1, count, end)."""
        self.slots = self.row_lengths.unsqueeze(1) + torch.arange(count, device=self.row_lengths.device)
        end = self.window_end = int(self.slots.max()) + 1  # the one host sync of a pass
        if end > self.capacity[0]:
            raise RuntimeError(f"KV cache holds {self.capacity[0]} tokens per row; {end} were requested")
        self.row_lengths = self.row_lengths + count
        keys = torch.arange(end, device=self.slots.device)
        return (keys.view(1, 1, end) <= self.slots.unsqueeze(-1)).unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this window's k, v (rows, heads, count, head_dim) at the reserved slots; return slots < end."""
        k = k.to(v.dtype)
        if self.keys[layer] is None:
            rows, heads, _, head_dim = k.shape
            shape = (rows, heads, self.capacity[layer], head_dim)
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        row_index = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
        # advanced indices around a slice put the indexed dims first: (rows, count, heads, head_dim)
        self.keys[layer][row_index, :, self.slots] = k.transpose(1, 2)
        self.values[layer][row_index, :, self.slots] = v.transpose(1, 2)
        end = self.lengths[layer] = self.window_end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def truncate(self, length: int | torch.Tensor) -> None:
        """Roll every row back to its first ``length`` tokens (one int, or one length per row)."""
        self.row_lengths = torch.minimum(self.row_lengths, torch.as_tensor(length, device=self.row_lengths.device))
        longest = self.length
        self.lengths = [min(current, longest) for current in self.lengths]
