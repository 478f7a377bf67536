"""Synthetic three-center abdominal CT with pancreas and tumour labels: the default data set.

A procedural abdomen in Hounsfield units is rendered through each center's scanner protocol
(voxel spacing, slice thickness, blur, noise, contrast phase, calibration), written as MSD Task07.

  protocols     contrast phases and each center's scanner protocol, with their real-world ranges
  shapes        the voxel grid, smooth random fields, rough ellipsoids, tubes along curves
  anatomy       tissue ids; the trunk and the organs painted into a tissue map
  rendering     attenuation, blur, slice profile, noise and calibration: one case's image and label
  measurements  noise, contrasts and contrast-to-noise ratios, as a physicist would measure them
  writing       files, dataset.json, the generation's parameters and version, finding a run's set
  preview       a PNG montage of the centers
"""

from dualseg_jax.data.phantoms.anatomy import Tissue
from dualseg_jax.data.phantoms.measurements import (
    MEASUREMENT_COLUMNS, VISIBILITY_CNR_FLOOR, edge_width_mm, measure_case, measure_center,
    measurement_table, noise_sigma_hu)
from dualseg_jax.data.phantoms.preview import SOFT_TISSUE_WINDOW_HU, write_preview
from dualseg_jax.data.phantoms.protocols import (
    CENTER_PROTOCOLS, LOW_DOSE_VENOUS_PHASE, PANCREATIC_PHASE, PORTAL_VENOUS_PHASE, CenterProtocol,
    ContrastPhase)
from dualseg_jax.data.phantoms.rendering import (
    AIR_HU, MIXED_TISSUE, PhantomCase, case_rng, generate_case, render_case, tissue_hu_table)
from dualseg_jax.data.phantoms.writing import (
    GENERATOR_VERSION, LABEL_NAMES, PARAMETERS_FILE, dataset_folder_name, default_root,
    ensure_synthetic_data, read_parameters, refuse_finished_set, write_dataset)
