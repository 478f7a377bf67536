"""One entry for every benchmark: the train step, a training run against it, the input pipeline,
the agreement of the SDF and mask targets, the contrast RandConv views keep, whole-volume
inference."""

from __future__ import annotations

from typing import Any, Iterator

import ml_collections


def run(what: str, config: ml_collections.ConfigDict, repeats: int = 10,
        inference_shape: tuple[int, int, int] | None = None, loader_batches: int = 20,
        train_steps: int = 60, workdir: str | None = None, step: int = 0
        ) -> Iterator[dict[str, Any]]:
  """Yields one row (a JSON-able dict naming the device) per measurement."""
  if what == 'step':
    from dualseg_jax.tools.bench import train as step_bench
    yield step_bench.benchmark_step(config, repeats=repeats)
  elif what == 'train':
    from dualseg_jax.tools.bench import train as step_bench
    yield step_bench.benchmark_training(config, steps=train_steps, repeats=repeats)
  elif what == 'loader':
    from dualseg_jax.tools.bench import data as loader_bench
    yield loader_bench.benchmark_loader(config, num_batches=loader_batches)
  elif what == 'balance':
    from dualseg_jax.tools.bench import train as step_bench
    yield step_bench.benchmark_balance(config, num_batches=loader_batches, workdir=workdir,
                                       step=step)
  elif what == 'targets':
    from dualseg_jax.tools.bench import data as loader_bench
    yield loader_bench.target_agreement(config, num_batches=loader_batches)
  elif what == 'views':
    from dualseg_jax.tools.bench import data as loader_bench
    yield loader_bench.view_contrast(config, num_batches=loader_batches)
  elif what == 'inference':
    from dualseg_jax.tools.bench import inference as inference_bench
    kwargs = {'shape': inference_shape} if inference_shape else {}
    yield from inference_bench.benchmark_inference(config, **kwargs)
  else:
    raise ValueError(f'unknown benchmark {what!r}: choose step, train, loader, targets, balance, views or inference')
