"""The online encoding producer: images -> frozen VAE latents, the next batch encoded while the step runs.

:class:`OnlineEncodingLoader` yields exactly what the synchronous reference
:class:`~usp_scale.data.loaders.OnlineLatentLoader` yields (same latents, same order, same resume position), but
with ``overlap`` it runs one batch ahead: before handing out batch b it fetches image batch b+1 and launches its
encode, on a side CUDA stream when the VAE is on a GPU. The training step of batch b (default stream) and the
encode of b+1 (side stream) then run concurrently, and the host copies and decode of the image loader happen
under the same side stream, so the step waits only for the encoder's own GPU time.

Stream safety: the consumer's stream waits on an event recorded after the encode, and every tensor handed out is
``record_stream``-ed on it, so the caching allocator does not reuse its memory for the next encode while the step
still reads it. Randomness: the posterior noise (``posterior="sample"``) comes from a generator seeded by (seed,
epoch, rank, batch) as in the reference, and nothing here draws from the global generators, so the training random
stream and exact resume are unchanged. On the CPU there is no stream; ``overlap`` then only changes when the work
happens (tests use it to check the values and the order).
"""
from __future__ import annotations

import contextlib

import torch

from .loaders import OnlineLatentLoader, ResumableLoader

_END = object()


class OnlineEncodingLoader(OnlineLatentLoader):
    """Images -> latents with a one-batch lookahead (``overlap``) on a side CUDA stream; see the module docstring."""

    def __init__(self, image_loader: ResumableLoader, vae, posterior: str = "mean", overlap: bool = True):
        super().__init__(image_loader, vae, posterior)
        self.overlap = overlap
        dev = torch.device(vae.device)
        self.stream = torch.cuda.Stream(dev) if overlap and dev.type == "cuda" else None

    def _side(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _launch(self, batch: dict, b: int):
        """Encode image batch ``b`` (on the side stream); returns (latent batch, event or None)."""
        with self._side():
            out = self._encode(batch, b)
            ev = None
            if self.stream is not None:
                ev = torch.cuda.Event()
                ev.record(self.stream)
        return out, ev

    def _hand_out(self, item):
        """Make the consumer's stream wait for the encode and own the tensors; returns the batch (or None)."""
        if item is None:
            return None
        out, ev = item
        if ev is not None:
            main = torch.cuda.current_stream(self.stream.device)
            main.wait_event(ev)
            for t in out.values():
                if torch.is_tensor(t) and t.is_cuda:
                    t.record_stream(main)
        return out

    def _iter_from(self, start: int):
        if not self.overlap:
            yield from super()._iter_from(start)
            return
        self.images.epoch, self.images.position = self.epoch, start
        it = self.images._iter_from(start)
        pending, have, b = None, False, start
        try:
            while True:
                with self._side():  # host->device copies / GPU decode of the image loader on the side stream
                    batch = next(it, _END)
                if batch is _END:
                    break
                cur = None if batch is None else self._launch(batch, b)
                b += 1
                if have:
                    yield self._hand_out(pending)
                pending, have = cur, True
            if have:
                yield self._hand_out(pending)
        finally:
            it.close()
