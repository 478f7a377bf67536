"""Which connected-component rule (`inference.postprocess`) a finished run should use: every
validation case (and, as a report only, every held-out test case) is predicted once, every rule
is applied to the same probabilities, and the validation Dice alone picks the rule.

Beside the Dice, each rule's false-positive volume far from the structure (predicted voxels more
than FAR_MARGIN_VOX voxels from the reference) says how much a network predicts where nothing is.
`head='sdf'` reads the signed-distance head's sign (inside where sdf < 0) in place of the
segmentation head's probabilities: what the dual task's second head would predict on its own.

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
# Which output the rules read: the segmentation head's probabilities, or the SDF head's sign.
HEADS = ('segmentation', 'sdf')
# Predicted voxels farther than this from the reference structure count as far false positives.
FAR_MARGIN_VOX = 3
FAR_FP = 'far_false_positive_ml'
# The report's row that no rule reaches: best_single_component, chosen with the reference.
BOUND = 'best single component (chosen with the reference: a bound, not a rule)'
JSON_NAME, MARKDOWN_NAME = 'postprocess_study.json', 'postprocess_study.md'


def _check(splits: Sequence[str], rules: Sequence[str], head: str = 'segmentation') -> None:
  if head not in HEADS:
    raise ConfigError(f'--head={head}: choose one of {HEADS}')
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


def _volume_outside_ml(prediction: np.ndarray, near: np.ndarray,
                       spacing_mm: Sequence[float]) -> float:
  far_voxels = np.count_nonzero(np.asarray(prediction, bool) & ~near)
  return float(far_voxels * np.prod(spacing_mm) / 1000.0)


def far_false_positive_ml(prediction: np.ndarray, reference: np.ndarray,
                          spacing_mm: Sequence[float]) -> float:
  """Volume (ml) of the predicted voxels farther than FAR_MARGIN_VOX voxels from every reference
  voxel (all of them when the reference is empty)."""
  return _volume_outside_ml(prediction, postprocess.dilate_voxels(reference, FAR_MARGIN_VOX),
                            spacing_mm)


def score_case(probabilities: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float],
               config: ml_collections.ConfigDict, rules: Sequence[str]
               ) -> dict[str, dict[str, float]]:
  """Dice per rule and structure of one case's (D, H, W, C) probabilities against its 0/1/2
  reference (a structure absent from both scores 1), and the far false-positive volume of the
  stage's outer structure (FAR_FP: the pancreas, or the tumour of a tumour stage)."""
  stage_structures = structures.stage_structures(config.stage)
  outer = structures.MASKS[stage_structures[0]]
  # The reference grown by the margin is the same for every rule: grown once per case.
  near = postprocess.dilate_voxels(outer(reference), FAR_MARGIN_VOX)
  scores = {}
  for rule in rules:
    label = postprocess.probabilities_to_label(probabilities, config.stage,
                                               with_rule(config.inference, rule),
                                               spacing_mm=spacing_mm)
    scores[rule] = {name: metrics_lib.dice(structures.MASKS[name](label),
                                           structures.MASKS[name](reference), both_empty=1.0)
                    for name in stage_structures}
    scores[rule][FAR_FP] = _volume_outside_ml(outer(label), near, spacing_mm)
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
  """{rule: {structure (and FAR_FP where scored): {mean, std, n}, 'mean_dice': mean over
  structures}} over cases."""
  summary = {}
  for rule in rules:
    cell = {}
    scored = [name for name in (*structure_names, FAR_FP)
              if all(name in scores[rule] for scores in per_case.values())]
    for name in scored:
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


def head_probabilities(outputs: dict[str, np.ndarray], head: str) -> np.ndarray:
  """(D, H, W, C) maps the rules read: the segmentation head's probabilities, or for 'sdf' the
  SDF head's sign as 0/1 (inside where sdf < 0, the mask the SDF->mask transform tends to)."""
  if head == 'sdf':
    return (outputs['sdf'] < 0).astype(np.float32)
  return outputs['probabilities']


def run_study(workdir: str | pathlib.Path, splits: Sequence[str] = ('val',),
              rules: Sequence[str] = postprocess.COMPONENT_RULES, tta_flips: int | None = None,
              checkpoint: str | None = None, show_progress: bool = True,
              head: str = 'segmentation') -> dict:
  """`python -m launch.postprocess_study`: predicts each case of `splits` once with the run's
  predictor (its config and best checkpoint, as launch.predict), scores every rule on `head`'s
  output, writes the report beside the run and returns it (postprocess_study.json/.md for the
  segmentation head, postprocess_study_sdf.json/.md for the SDF head)."""
  workdir = pathlib.Path(workdir)
  splits, rules = list(dict.fromkeys(splits)), list(dict.fromkeys(rules))
  _check(splits, rules, head)
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
            'run_rule': config.inference.postprocess, 'head': head,
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
      probabilities = head_probabilities(
          predictor.predict_probabilities(image, tta_flips=tta_flips), head)
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


def report_names(head: str) -> tuple[str, str]:
  """(JSON, Markdown) file names of a study of `head`: the segmentation head's keep the names
  they always had."""
  if head == 'segmentation':
    return JSON_NAME, MARKDOWN_NAME
  return tuple(name.replace('.', f'_{head}.') for name in (JSON_NAME, MARKDOWN_NAME))


def write_report(report: dict, workdir: pathlib.Path) -> None:
  head = report.get('head', 'segmentation')
  json_name, markdown_name = report_names(head)
  files.write_json(workdir / json_name, report)
  outer = report['structures'][0]
  columns, rows = ['Rule'], []
  for split in report['splits']:
    columns += [f'{split} {name} Dice (%)' for name in report['structures']]
    if split == 'val':
      columns.append('val mean Dice (%)')
    columns.append(f'{split} {outer} far false positives (ml)')

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
      far = cell.get(FAR_FP)
      cells.append(tables.format_cell(far['mean'], far['std'], digits=1) if far else '')
    return cells

  for rule in report['rules']:
    label = f'**{rule}** (preferred)' if rule == report['preferred_rule'] else rule
    label += ' (the run\'s)' if rule == report['run_rule'] else ''
    rows.append([label] + cells_of(lambda content, rule=rule: content['summary'][rule]))
  rows.append([BOUND] + cells_of(lambda content: content['bound']['summary']))
  counts = ', '.join(f'{split} {len(content["cases"])} cases'
                     for split, content in report['splits'].items())
  settings = report['settings']
  read = ('the SDF head\'s sign (inside where sdf < 0)' if head == 'sdf'
          else 'the segmentation head\'s probabilities')
  use = (f'To use it, set "postprocess": "{report["preferred_rule"]}" in the "inference" section '
         'of the run\'s config.json (launch.predict reads it there).' if head == 'segmentation'
         else 'launch.predict labels the segmentation head\'s output; this study of the SDF head '
         'is a measurement.')
  text = [f'# Post-processing study of {report["workdir"]}', '',
          f'Dice mean ± std over cases ({counts}); each case predicted once '
          f'(checkpoint {report["checkpoint"]}, {report["tta_flips"]} flip combination(s)), '
          f'every rule applied to the same output, {read} (threshold {settings["threshold"]}, '
          f'component_fraction {settings["component_fraction"]}, min_component_mm3 '
          f'{settings["min_component_mm3"]}). A structure absent from a case and from its '
          f'prediction scores 100. Far false positives: predicted {outer} voxels more than '
          f'{FAR_MARGIN_VOX} voxels from the reference {outer}, mean ± std over cases.', '',
          tables.markdown(columns, rows),
          f'Validation prefers `{report["preferred_rule"]}` (highest mean validation Dice over '
          'the structures)' + ('; the test columns are a report only and never choose the rule.'
                               if 'test' in report['splits'] else '.'),
          use, '']
  files.write_bytes(workdir / markdown_name, '\n'.join(text).encode())
