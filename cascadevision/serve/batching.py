"""Requests that arrive together share a forward pass.

The first request waits at most `max_wait_s` for others; the ones that came by then (at most `max_batch`) run
as one batch in a single worker thread, so the event loop keeps accepting connections while the model computes,
and the model is only ever called from that one thread. Images of one size are stacked into one forward; a
batch of several sizes runs one forward per size, so that an answer never depends on what it was batched with
(a bigger neighbour would pad the image more, and the padding reaches the border features).
"""
from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch


class Batcher:
    def __init__(self, run: Callable[[list[torch.Tensor]], list[dict]], *, max_batch: int, max_wait_s: float):
        self.run = run  # list of images -> list of predictions (called in the worker thread)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascadevision-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()
        self.requests = 0  # images predicted
        self.forwards = Counter()  # batch size -> forward passes of that size

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "forwards": sum(self.forwards.values()),
                    "largest_batch": max(self.forwards, default=0),
                    "batch_sizes": {str(k): v for k, v in sorted(self.forwards.items())}}

    async def predict(self, image: torch.Tensor) -> dict:
        """The prediction for one uint8 (3, H, W) image, computed in a batch with the requests around it."""
        if self._task is None or self._task.done():  # started by the first request, in the serving loop
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, future))
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(image, future) for image, future in batch if not future.done()]  # a client that left
            sizes: dict[tuple, list] = {}
            for item in batch:
                sizes.setdefault(tuple(item[0].shape), []).append(item)
            for group in sizes.values():
                await self._run(loop, group)

    async def _run(self, loop, group: list) -> None:
        try:
            predictions = await loop.run_in_executor(self._executor, self._forward, [image for image, _ in group])
        except Exception as exc:  # noqa: BLE001 - the model's failure is each waiting request's answer
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), prediction in zip(group, predictions, strict=True):
            if not future.done():
                future.set_result(prediction)

    def _forward(self, images: list[torch.Tensor]) -> list[dict]:
        predictions = self.run(images)
        with self._lock:
            self.requests += len(images)
            self.forwards[len(images)] += 1
        return predictions
