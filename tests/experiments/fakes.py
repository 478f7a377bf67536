"""A stand-in for train_and_evaluate that writes what a finished run leaves behind (config.json,
the held-out summary.json) with scores that are a known function of the config."""

import hashlib
import json
import pathlib

from dualseg_jax.train import loop


def expected_scores(config) -> dict[str, dict[str, float]]:
  """Dice/HD95/NSD per structure: grows with each enabled loss, shifted by the seed and held-out
  center, so every run of a table has its own numbers."""
  enabled = sum(1 for value in config.loss.weights.values() if value > 0)
  center_shift = 0.01 * sorted(config.data.centers).index(config.data.test_center)
  seed_shift = 0.005 * (config.seed - 2022)
  fold_shift = 0.02 * max(config.data.fold, 0)
  base = {'tumour': 0.2, 'pancreas': 0.6}
  return {structure: {'dice': offset + 0.05 * enabled + center_shift + seed_shift + fold_shift,
                      'hd95_mm': 10.0 - enabled + fold_shift,
                      'nsd': offset + 0.1 + 0.04 * enabled}
          for structure, offset in base.items()}


class FakeTraining:
  """Counts calls; `stop_on_call=k` makes the k-th call behave like a run stopped by SIGTERM."""

  def __init__(self, stop_on_call: int | None = None):
    self.calls: list[str] = []
    self.stop_on_call = stop_on_call

  def __call__(self, config, workdir, **unused):
    workdir = pathlib.Path(workdir)
    self.calls.append(workdir.name)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(
        json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
    if self.stop_on_call == len(self.calls):
      return loop.RunResult(workdir, 1, 0.1, True, None, None)
    center = config.data.test_center if config.data.fold == -1 else 'all'
    tag = f'test_{config.data.test_center}' if config.data.fold == -1 else 'test_mixed'
    scores = expected_scores(config)
    cell = lambda value, excluded=0: {'mean': value, 'std': 0.01, 'median': value,
                                      'n': 2 - excluded, 'n_excluded': excluded}
    # One tumour case has an empty prediction: its infinite HD95 is left out of the mean.
    by_structure = {structure: {metric: cell(value, int(structure == 'tumour' and metric == 'hd95_mm'))
                                for metric, value in metrics.items()}
                    for structure, metrics in scores.items()}
    summary = {'by_center': {'all': by_structure, center: by_structure}}
    out = workdir / 'evaluation' / tag
    out.mkdir(parents=True, exist_ok=True)
    (out / 'summary.json').write_text(json.dumps(summary))
    return loop.RunResult(workdir, config.train.steps, 0.1, False, None, summary)


def sha256_of(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()
