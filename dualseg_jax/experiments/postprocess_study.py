"""Which connected-component rule (`inference.postprocess`) a finished run should use: every
validation case (and, as a report only, every held-out test case) is predicted once, every rule
is applied to the same probabilities, and the validation Dice alone picks the rule.

Writes <run>/postprocess_study.json (per case and summary) and postprocess_study.md.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import ml_collections
import numpy as np
import scipy.ndimage as ndimage
import tqdm

from dualseg_jax import files
from dualseg_jax import run_dir
from dualseg_jax import structures
from dualseg_jax.data import io
from dualseg_jax.data import pipeline
from dualseg_jax.errors import ConfigError
from dualseg_jax.evaluation import metrics as metrics_lib
from dualseg_jax.experiments import tables
from dualseg_jax.inference import postprocess
from dualseg_jax.inference import predictor as predictor_lib

SPLITS = ('val', 'test')
# The report's row that no rule reaches: best_single_component, chosen with the reference.
BOUND = 'best single component (chosen with the reference: a bound, not a rule)'
JSON_NAME, MARKDOWN_NAME = 'postprocess_study.json', 'postprocess_study.md'


def _check(splits: Sequence[str], rules: Sequence[str]) -> None:
  unknown = [split for split in splits if split not in SPLITS]
  if unknown or 'val' not in splits:
    raise ConfigError(f'--split={",".join(splits)}: give val, optionally with test (val,test); '
                      'validation chooses the rule, the test center is only reported')
  unknown = [rule for rule in rules if rule not in postprocess.COMPONENT_RULES]
  if unknown or not rules:
    raise ConfigError(f'--rules={",".join(rules)}: choose among {postprocess.COMPONENT_RULES}')


def split_cases(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, list]:
  """The run's labelled validation cases (the list its Validator scored) and test cases."""
  pipeline.resolve_data_root(config)
  split = pipeline.prepare(config, workdir).split
  return {'val': [case for case in split.val if case.label_path],
          'test': [case for case in split.test if case.label_path]}


def with_rule(inference_config: ml_collections.ConfigDict, rule: str) -> ml_collections.ConfigDict:
  changed = ml_collections.ConfigDict(inference_config.to_dict())
  changed.postprocess = rule
  return changed


def score_case(probabilities: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float],
               config: ml_collections.ConfigDict, rules: Sequence[str]
               ) -> dict[str, dict[str, float]]:
  """Dice per rule and structure of one case's (D, H, W, C) probabilities against its 0/1/2
  reference; a structure absent from both scores 1."""
  scores = {}
  for rule in rules:
    label = postprocess.probabilities_to_label(probabilities, config.stage,
                                               with_rule(config.inference, rule),
                                               spacing_mm=spacing_mm)
    scores[rule] = {name: metrics_lib.dice(structures.MASKS[name](label),
                                           structures.MASKS[name](reference), both_empty=1.0)
                    for name in structures.stage_structures(config.stage)}
  return scores


def best_single_component(probabilities: np.ndarray, reference: np.ndarray,
                          config: ml_collections.ConfigDict) -> dict[str, float]:
  """Per output channel, the best Dice against its structure in the reference over keeping one
  26-connected component of the thresholded channel, or none: the most a rule that keeps one
  component could score on that channel, before the channels are combined (so the pancreas's
  figure leaves out tumour-channel voxels a rule's label map adds to the gland). It is chosen
  with the reference, so it is a bound that says what the false-positive components cost, never
  a rule; nothing lets it choose one."""
  scores = {}
  for channel, name in enumerate(structures.stage_structures(config.stage)):
    truth = structures.MASKS[name](reference)
    components, count = ndimage.label(probabilities[..., channel] > config.inference.threshold,
                                      structure=postprocess.FULL_CONNECTIVITY)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    overlaps = np.bincount(components[truth].ravel(), minlength=count + 1)[1:]
    reference_voxels = int(truth.sum())
    best = 1.0 if reference_voxels == 0 else 0.0  # keeping nothing
    if count:
      best = max(best, float(np.max(2.0 * overlaps / (sizes + reference_voxels))))
    scores[name] = best
  return scores


def summarise(per_case: dict[str, dict[str, dict[str, float]]], rules: Sequence[str],
              structure_names: Sequence[str]) -> dict[str, dict]:
  """{rule: {structure: {mean, std, n}, 'mean_dice': mean over structures}} over cases."""
  summary = {}
  for rule in rules:
    cell = {}
    for name in structure_names:
      mean, std, count = tables.mean_and_std([scores[rule][name] for scores in per_case.values()])
      cell[name] = {'mean': mean, 'std': std, 'n': count}
    means = [cell[name]['mean'] for name in structure_names if cell[name]['mean'] is not None]
    cell['mean_dice'] = float(np.mean(means)) if means else None
    summary[rule] = cell
  return summary


def preferred_rule(validation_summary: dict[str, dict], rules: Sequence[str]) -> str | None:
  """The rule with the highest validation Dice averaged over structures; the first listed wins
  a tie. Only the validation summary is an argument: the test center cannot choose."""
  scored = [rule for rule in rules if validation_summary[rule]['mean_dice'] is not None]
  if not scored:
    return None
  return max(scored, key=lambda rule: (validation_summary[rule]['mean_dice'], -rules.index(rule)))


def run_study(workdir: str | pathlib.Path, splits: Sequence[str] = ('val',),
              rules: Sequence[str] = postprocess.COMPONENT_RULES, tta_flips: int | None = None,
              checkpoint: str | None = None, show_progress: bool = True) -> dict:
  """`python -m launch.postprocess_study`: predicts each case of `splits` once with the run's
  predictor (its config and best checkpoint, as launch.predict), scores every rule, writes the
  report beside the run and returns it."""
  workdir = pathlib.Path(workdir)
  splits, rules = list(dict.fromkeys(splits)), list(dict.fromkeys(rules))
  _check(splits, rules)
  config = run_dir.load_config(workdir)
  cases = split_cases(config, workdir)
  if not cases['val']:
    raise ConfigError(f'{workdir} has no labelled validation case (data.val_fraction='
                      f'{config.data.val_fraction}): nothing can choose the rule')
  predictor = predictor_lib.load_predictor(workdir, checkpoint=checkpoint)
  stage_structures = structures.stage_structures(config.stage)
  report = {'workdir': str(workdir), 'stage': config.stage,
            'checkpoint': checkpoint or config.inference.checkpoint,
            'tta_flips': config.inference.tta_flips if tta_flips is None else tta_flips,
            'run_rule': config.inference.postprocess,
            'settings': {'threshold': config.inference.threshold,
                         'component_fraction': config.inference.component_fraction,
                         'min_component_mm3': config.inference.min_component_mm3},
            'rules': rules, 'structures': list(stage_structures), 'splits': {}}
  for split in splits:
    per_case, bound = {}, {}
    for case in tqdm.tqdm(cases[split], desc=f'{split} cases', unit='case',
                          disable=not show_progress):
      image, reference = io.read_case(case.image_path, case.label_path,
                                      config.data.label_map or None)
      probabilities = predictor.predict_volume(image, tta_flips=tta_flips)['probabilities']
      per_case[case.case_id] = score_case(probabilities, reference.array, image.spacing_mm,
                                          config, rules)
      bound[case.case_id] = {BOUND: best_single_component(probabilities, reference.array, config)}
    report['splits'][split] = {'cases': sorted(per_case),
                               'summary': summarise(per_case, rules, stage_structures),
                               'per_case': per_case,
                               'bound': {'summary': summarise(bound, [BOUND], stage_structures)[BOUND],
                                         'per_case': {case_id: scores[BOUND] for case_id, scores
                                                      in bound.items()}}}
  report['preferred_rule'] = preferred_rule(report['splits']['val']['summary'], rules)
  write_report(report, workdir)
  return report


def write_report(report: dict, workdir: pathlib.Path) -> None:
  files.write_json(workdir / JSON_NAME, report)
  columns, rows = ['Rule'], []
  for split in report['splits']:
    columns += [f'{split} {name} Dice (%)' for name in report['structures']]
    if split == 'val':
      columns.append('val mean Dice (%)')

  def cells_of(summary_of) -> list[str]:
    """One row's cells: each split's Dice per structure (and validation's mean), from the
    summary `summary_of(split content)` gives."""
    cells = []
    for split, content in report['splits'].items():
      cell = summary_of(content)
      cells += [tables.format_cell(cell[name]['mean'], cell[name]['std'], scale=100.0, digits=2)
                for name in report['structures']]
      if split == 'val':
        cells.append(tables.format_cell(cell['mean_dice'], scale=100.0, digits=2))
    return cells

  for rule in report['rules']:
    label = f'**{rule}** (preferred)' if rule == report['preferred_rule'] else rule
    label += ' (the run\'s)' if rule == report['run_rule'] else ''
    rows.append([label] + cells_of(lambda content, rule=rule: content['summary'][rule]))
  rows.append([BOUND] + cells_of(lambda content: content['bound']['summary']))
  counts = ', '.join(f'{split} {len(content["cases"])} cases'
                     for split, content in report['splits'].items())
  settings = report['settings']
  text = [f'# Post-processing study of {report["workdir"]}', '',
          f'Dice mean ± std over cases ({counts}); each case predicted once '
          f'(checkpoint {report["checkpoint"]}, {report["tta_flips"]} flip combination(s)), '
          f'every rule applied to the same probabilities (threshold {settings["threshold"]}, '
          f'component_fraction {settings["component_fraction"]}, min_component_mm3 '
          f'{settings["min_component_mm3"]}). A structure absent from a case and from its '
          'prediction scores 100.', '',
          tables.markdown(columns, rows),
          f'Validation prefers `{report["preferred_rule"]}` (highest mean validation Dice over '
          'the structures)' + ('; the test columns are a report only and never choose the rule.'
                               if 'test' in report['splits'] else '.'),
          f'To use it, set "postprocess": "{report["preferred_rule"]}" in the "inference" section '
          'of the run\'s config.json (launch.predict reads it there).', '']
  files.write_bytes(workdir / MARKDOWN_NAME, '\n'.join(text).encode())
