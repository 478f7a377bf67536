"""Writes the synthetic three-center CT set: `python -m launch.make_phantoms --out=DIR
--cases_per_center=N --seed=S [--centers=center_a,center_b] [--preview=FILE.png] [--measure]`.

`--measure` also prints, per center, tumour contrast, noise, contrast-to-noise ratio, gland
contrasts and tumour size on the images resampled to each `--measure_spacing_mm` (by default the
quick preset's 3 x 3 x 3 mm and the paper preset's 2.5 x 1.5 x 1.5 mm).

Layout per center: DIR/<center>/imagesTr, labelsTr, dataset.json (MSD Task07 style).
"""

from absl import flags

from dualseg_jax.data import phantoms
from launch import cli

_OUT = flags.DEFINE_string('out', None, 'Folder to write the centers into.')
_CASES_PER_CENTER = flags.DEFINE_integer('cases_per_center', 8, 'Cases generated per center.')
_SEED = flags.DEFINE_integer('seed', 0, 'Same seed, same bytes.')
_CENTERS = flags.DEFINE_list('centers', list(phantoms.CENTER_PROTOCOLS),
                             f'Subset of {sorted(phantoms.CENTER_PROTOCOLS)}.')
_PREVIEW = flags.DEFINE_string('preview', None, 'Optional PNG montage, one slice per center.')
_MEASURE = flags.DEFINE_boolean(
    'measure', False, 'Print per-center physical measurements at each --measure_spacing_mm.')
_MEASURE_SPACING_MM = flags.DEFINE_multi_string(
    'measure_spacing_mm', ['3,3,3', '2.5,1.5,1.5'],
    'z,y,x spacing (mm) the images are resampled to (linearly) before --measure; repeatable.')
_OVERWRITE = flags.DEFINE_boolean(
    'overwrite', False, 'Replace a finished set already in --out (runs that read it then refuse '
    'to resume or be evaluated, since their data changed).')
flags.mark_flags_as_required(['out'])


def main(argv):
  del argv
  try:
    spacings = [tuple(float(s) for s in text.split(',')) for text in _MEASURE_SPACING_MM.value]
  except ValueError:
    raise cli.CommandLineError(f'--measure_spacing_mm={_MEASURE_SPACING_MM.value}: use z,y,x in '
                               'mm, e.g. --measure_spacing_mm=3,3,3')
  if not _OVERWRITE.value:
    phantoms.refuse_finished_set(_OUT.value)
  summary = phantoms.write_dataset(_OUT.value, _CASES_PER_CENTER.value, _SEED.value,
                                   _CENTERS.value, preview_path=_PREVIEW.value,
                                   measure_spacings_mm=spacings if _MEASURE.value else ())
  print(f'{"center":9} {"cases":>5} {"tumour":>6} {"spacing z,y,x mm":>17} {"noise HU":>8} '
        f'{"pancreas HU":>11} {"tumour HU":>9} {"contrast HU":>11} {"edge mm":>7} {"s/case":>6}')
  for center, row in summary.items():
    spacing = ','.join(f'{s:g}' for s in row['spacing_mm'])
    print(f'{center:9} {row["cases"]:5d} {row["tumour_cases"]:6d} {spacing:>17} '
          f'{row["noise_sigma_hu"]:8.1f} {row["pancreas_hu"]:11.1f} {row["tumour_hu"]:9.1f} '
          f'{row["tumour_contrast_hu"]:11.1f} {row["edge_width_mm"]:7.1f} '
          f'{row["seconds_per_case"]:6.2f}')
  for spacing in spacings if _MEASURE.value else ():
    print(f'\nresampled to {",".join(f"{s:g}" for s in spacing)} mm (z,y,x), linear:')
    print(phantoms.measurement_table(
        {center: row['resampled'][spacing] for center, row in summary.items()}))
  if _PREVIEW.value:
    print(f'preview: {_PREVIEW.value}')


if __name__ == '__main__':
  cli.run(main)
