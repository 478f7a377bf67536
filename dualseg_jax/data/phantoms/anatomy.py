"""The synthetic patient: tissue ids, the trunk (table, skin, fat, wall, spine, ribs, muscles) and
the abdominal organs, painted into a tissue map in an order where later ones win."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
from scipy import ndimage

from dualseg_jax.data.phantoms import shapes


class Tissue(enum.IntEnum):
  """The ids of the tissue map the anatomy is painted into (rendering gives each its HU)."""

  AIR = 0
  TABLE = 1
  FAT = 2
  MUSCLE = 3
  BONE_CORTEX = 4
  BONE_MARROW = 5
  DISC = 6
  SPINAL_CANAL = 7
  LIVER = 8
  SPLEEN = 9
  KIDNEY_CORTEX = 10
  KIDNEY_MEDULLA = 11
  RENAL_SINUS = 12
  GALLBLADDER = 13
  BOWEL_WALL = 14
  BOWEL_FLUID = 15
  BOWEL_GAS = 16
  STOOL = 17
  AORTA = 18  # and the arteries leaving it
  PORTAL_VEIN = 19  # with the superior mesenteric and splenic veins
  CAVAL_VEIN = 20  # with the renal veins
  PANCREAS = 21
  PANCREATIC_DUCT = 22
  TUMOUR = 23


@dataclasses.dataclass(frozen=True)
class Body:
  """Outline of the trunk and its layers, in the axial plane."""

  semi_x_mm: float
  semi_y_anterior_mm: float
  semi_y_posterior_mm: float
  outline_harmonics: np.ndarray  # (k, 3): order, amplitude, phase
  fat_mm: float
  wall_mm: float
  widening_per_mm: float  # the trunk widens inferiorly

  def radius_mm(self, angle):
    """Distance from the body axis to the skin along an axial direction (angle from +x)."""
    cos, sin = np.abs(np.cos(angle)), np.sin(angle)
    anterior = sin >= 0
    semi_y = np.where(anterior, self.semi_y_anterior_mm, self.semi_y_posterior_mm)
    # The back rests on the table: a flatter, squarer posterior outline.
    power = np.where(anterior, 2.0, 2.8)
    radius = (cos / self.semi_x_mm) ** power + (np.abs(sin) / semi_y) ** power
    radius = radius ** (-1.0 / power)
    modulation = 1.0
    for order, amplitude, phase in self.outline_harmonics:
      modulation = modulation + amplitude * np.cos(order * angle + phase)
    return radius * modulation

  def fat_thickness_mm(self, angle):
    # Subcutaneous fat collects anteriorly and on the flanks.
    return self.fat_mm * (1.0 + 0.3 * np.sin(angle) + 0.1 * np.cos(2 * angle))

  def depth_mm(self, z, y, x):
    """Depth below the skin (negative outside the body)."""
    angle = np.arctan2(y, x)
    scale = 1.0 + self.widening_per_mm * np.clip(-z, -60.0, 200.0)
    return self.radius_mm(angle) * scale - np.sqrt(x * x + y * y)


def draw_body(rng) -> Body:
  """One patient's trunk: its size, outline and fat and wall thicknesses."""
  harmonics = np.stack([np.arange(2, 6), rng.uniform(0.0, 0.03, 4) / np.arange(1, 5) ** 0.5,
                        rng.uniform(0, 2 * np.pi, 4)], axis=1)
  return Body(semi_x_mm=rng.uniform(135, 165), semi_y_anterior_mm=rng.uniform(105, 135),
              semi_y_posterior_mm=rng.uniform(95, 115), outline_harmonics=harmonics,
              fat_mm=rng.uniform(8, 35), wall_mm=rng.uniform(8, 12),
              widening_per_mm=rng.uniform(0.0, 0.0008))


def paint_trunk(tissue, grid, rng, body: Body) -> tuple[float, np.ndarray]:
  """Table, skin, fat, abdominal wall, spine, back muscles and ribs; returns the spine's y and
  the abdominal cavity (inside the wall) that organs are clipped to."""
  z, y, x = grid.coordinates()
  table_y = -body.semi_y_posterior_mm - 4.0 + 0.0012 * x * x
  table = (y < table_y) & (y > table_y - 6.0) & (np.abs(x) < 230)
  tissue[np.broadcast_to(table, tissue.shape)] = Tissue.TABLE

  depth = body.depth_mm(z, y, x)
  angle = np.arctan2(y, x)
  fat = body.fat_thickness_mm(angle)
  tissue[depth >= 0] = Tissue.FAT
  in_wall = (depth >= fat) & (depth < fat + body.wall_mm)
  tissue[in_wall] = Tissue.MUSCLE
  # Intraperitoneal and retroperitoneal fat fill the cavity until organs are painted.
  cavity = depth >= fat + body.wall_mm

  # Ribs run inside the wall and descend towards the front; below the costal margin, which
  # rises from the back to the front, there are none.
  angle_from_back = np.abs(np.angle(np.exp(1j * (angle + np.pi / 2))))
  along_rib = z + 0.4 * angle_from_back * body.semi_x_mm
  rib_phase = rng.uniform(0, 36.0)
  lowest_rib_mm = rng.uniform(-25.0, 0.0)  # height of the costal margin beside the spine
  ribs = ((np.abs(depth - fat - 0.5 * body.wall_mm) < 4.0)
          & (np.mod(along_rib + rib_phase, 36.0) < 8.0)
          & (z > lowest_rib_mm + 40.0 * (angle_from_back - 0.45))
          & (angle_from_back > 0.45) & (angle_from_back < 2.5))
  tissue[ribs] = Tissue.BONE_CORTEX

  posterior_fat = float(body.fat_thickness_mm(-np.pi / 2))
  spine_y = -body.semi_y_posterior_mm + posterior_fat + rng.uniform(62, 72)
  _paint_spine(tissue, grid, rng, spine_y)

  # Erector spinae beside the spinous processes, psoas beside the vertebral bodies.
  for side in (-1.0, 1.0):
    box, mask = shapes.ellipsoid(grid, (0.0, spine_y - 52.0, side * 36.0), (400.0, 24.0, 30.0))
    shapes.paint(tissue, box, mask, Tissue.MUSCLE)
    psoas_box = grid.box((-400, spine_y - 40, side * 34 - 40), (60, spine_y + 25, side * 34 + 40))
    if psoas_box is not None:
      pz, py, px = grid.coordinates(psoas_box)
      radius = np.clip(6.0 + 0.14 * (25.0 - pz), 3.0, 24.0)
      mask = ((py - spine_y - 2.0) ** 2 + (px - side * (32.0 + 0.3 * radius)) ** 2 < radius ** 2)
      shapes.paint(tissue, psoas_box, mask & (pz < 25.0), Tissue.MUSCLE)
  return spine_y, cavity


def _paint_spine(tissue, grid, rng, spine_y: float) -> None:
  box = grid.box((-1000, spine_y - 80, -60), (1000, spine_y + 25, 60))
  if box is None:
    return
  z, y, x = grid.coordinates(box)
  region = tissue[box]
  body_radius = ((x / 21.0) ** 2 + ((y - spine_y) / 17.0) ** 2)
  period_mm, disc_mm = 34.0, 8.0
  level = np.mod(z + rng.uniform(0, period_mm), period_mm)
  disc = np.broadcast_to(level < disc_mm, region.shape)
  vertebral_body = np.broadcast_to(body_radius < 1.0, region.shape)
  marrow = np.broadcast_to(body_radius < 0.78, region.shape)
  region[vertebral_body] = Tissue.BONE_CORTEX
  region[marrow & ~disc] = Tissue.BONE_MARROW
  region[vertebral_body & disc] = Tissue.DISC

  canal_y = spine_y - 29.0
  canal_radius = np.sqrt(x ** 2 + (y - canal_y) ** 2)
  bony_level = ~disc
  arch = (canal_radius < 16.0) & (canal_radius >= 9.0) & (y < spine_y - 14.0)
  spinous = (np.abs(x) < 4.5) & (y < canal_y - 10.0) & (y > canal_y - 45.0) & (level > 12.0)
  transverse = (np.abs(x) < 36.0) & (np.abs(y - canal_y - 4.0) < 4.0) & (level > 16.0) & (
      level < 24.0)
  region[np.broadcast_to(arch, region.shape) & bony_level] = Tissue.BONE_CORTEX
  region[np.broadcast_to(spinous | transverse, region.shape)] = Tissue.BONE_CORTEX
  region[np.broadcast_to(canal_radius < 9.0, region.shape)] = Tissue.SPINAL_CANAL


def _paint_tube(tissue, grid, curve: shapes.Curve, inside: Tissue, wall: Tissue | None = None,
                wall_mm: float = 2.5, cavity=None, gas_above_y=None, texture=None,
                gas_texture_level=None) -> None:
  """A hollow organ or vessel along a curve; optional gas above a level or in mottled pockets."""
  box, distance, radius, _ = curve.tube(grid)
  if box is None:
    return
  outer = distance <= radius
  if cavity is not None:
    outer &= cavity[box]
  region = tissue[box]
  if wall is None:
    region[outer] = inside
    return
  lumen = outer & (distance <= radius - wall_mm)
  region[outer] = wall
  region[lumen] = inside
  if gas_above_y is not None:
    _, y, _ = grid.coordinates(box)
    region[lumen & np.broadcast_to(y > gas_above_y, lumen.shape)] = Tissue.BOWEL_GAS
  if gas_texture_level is not None:
    region[lumen & (texture[box] > gas_texture_level)] = Tissue.BOWEL_GAS


def _draw_pancreas(rng, spine_y: float, side_x: float) -> shapes.Curve:
  """Centreline from the uncinate process through head, neck and body to the tail at the spleen;
  `side_x` is the distance from the midline to the inner lateral wall."""
  relative = np.array([  # (z, y above the spine, x) in mm
      (-30.0, 38.0, 20.0),  # uncinate process, behind the superior mesenteric vein
      (-16.0, 50.0, 36.0),  # head, in the duodenal C-loop
      (-2.0, 60.0, 30.0),
      (2.0, 68.0, 8.0),  # neck, in front of the portal confluence
      (8.0, 64.0, -25.0),  # body, across the aorta
      (16.0, 50.0, -58.0),
      (24.0, 30.0, -82.0),  # tail, towards the splenic hilum
      (30.0, 16.0, -96.0),
  ])
  relative = shapes.jitter(rng, relative, 4.0)
  # A narrow abdomen brings the tail (and the spleen) towards the midline.
  left = relative[:, 2] < 0
  relative[left, 2] *= np.clip((side_x - 15.0) / 105.0, 0.75, 1.1)
  relative[:, 1] += spine_y
  relative[:, 1] += rng.uniform(-4, 6)
  radii = np.array([10.0, 15.0, 14.0, 9.0, 10.0, 9.5, 8.5, 6.0])
  radii = radii * rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, size=radii.shape)
  return shapes.Curve.through(relative, radii)


def _draw_tumour(rng, pancreas: shapes.Curve) -> dict:
  # Most pancreatic adenocarcinomas arise in the head.
  region = rng.choice(3, p=(0.6, 0.25, 0.15))
  fraction = rng.uniform(*((0.05, 0.33), (0.33, 0.7), (0.7, 0.93))[region])
  center, local_radius = pancreas.point_at(fraction)
  center = center + rng.normal(size=3) * 0.35 * local_radius
  radius = float(np.exp(rng.uniform(np.log(5.0), np.log(20.0))))
  return dict(center=center, radius_mm=radius,
              semi_axes=radius * rng.uniform(0.75, 1.25, size=3),
              rotation=shapes.rotation_about_z(rng.uniform(0, np.pi)) @ shapes.rotation_about_y(
                  rng.uniform(-0.5, 0.5)),
              roughness=shapes.CosineField.draw(rng, (0.8 * radius, 2.5 * radius)),
              fraction=fraction, duct_dilated=bool(rng.uniform() < 0.5 and fraction < 0.7))


def paint_organs(tissue, grid, rng, body: Body, spine_y: float, cavity: np.ndarray,
                 texture: np.ndarray, with_tumour: bool) -> None:
  """Solid organs, bowel, pancreas and tumour, then vessels, in an order where later ones win.

  Each group draws from `rng` in turn: their order is part of what a seed generates.
  """
  front_y = (body.semi_y_anterior_mm - float(body.fat_thickness_mm(np.pi / 2))
             - body.wall_mm)  # inner surface of the anterior wall
  side_x = body.semi_x_mm - float(body.fat_thickness_mm(0.0)) - body.wall_mm
  _paint_solid_organs(tissue, grid, rng, cavity, spine_y, front_y, side_x)
  _paint_bowel(tissue, grid, rng, cavity, texture, spine_y, front_y)
  pancreas = _draw_pancreas(rng, spine_y, side_x)
  _paint_duodenum(tissue, grid, rng, cavity, spine_y, pancreas)
  _paint_pancreas(tissue, grid, rng, cavity, pancreas, with_tumour)
  _paint_vessels(tissue, grid, rng, spine_y, pancreas)


def _paint_solid_organs(tissue, grid, rng, cavity: np.ndarray, spine_y: float, front_y: float,
                        side_x: float) -> None:
  """Liver and gallbladder, spleen, kidneys: rough ellipsoids clipped to the cavity."""

  def organ(center, semi, value, rotation=None, wavelength=(40.0, 90.0), amplitude=0.08):
    field = shapes.CosineField.draw(rng, wavelength)
    box, mask = shapes.ellipsoid(grid, center, semi, rotation, field, amplitude)
    if box is not None:
      shapes.paint(tissue, box, mask & cavity[box], value)

  # Liver: right lobe under the ribs, left lobe across the midline in front of the stomach.
  liver_scale = rng.uniform(0.9, 1.1)
  organ(shapes.jitter(rng, (62.0, spine_y + 55.0, 70.0), 6.0),
        np.array((78.0, 85.0, 72.0)) * liver_scale, Tissue.LIVER,
        shapes.rotation_about_z(rng.uniform(-0.2, 0.2)))
  organ(shapes.jitter(rng, (62.0, front_y - 28.0, -5.0), 6.0),
        np.array((38.0, 26.0, 55.0)) * liver_scale, Tissue.LIVER)
  # Caudate lobe, wrapping the vena cava.
  organ(shapes.jitter(rng, (40.0, spine_y + 45.0, 22.0), 4.0), np.array((30.0, 22.0, 24.0)),
        Tissue.LIVER)
  organ(shapes.jitter(rng, (8.0, front_y - 22.0, 68.0), 5.0), (30.0, 13.0, 13.0),
        Tissue.GALLBLADDER, shapes.rotation_about_y(rng.uniform(-0.5, -0.2)), amplitude=0.04)

  # Spleen: posterior left, its hilum facing the pancreatic tail.
  organ(shapes.jitter(rng, (40.0, spine_y + 2.0, -(side_x - 26.0)), 5.0),
        np.array((50.0, 44.0, 24.0)) * rng.uniform(0.85, 1.15), Tissue.SPLEEN,
        shapes.rotation_about_z(rng.uniform(0.3, 0.7)))

  # Kidneys: the right one lower, under the liver; cortex, medulla and a fatty sinus at the hilum.
  for side, height in ((-1.0, rng.uniform(-15, -5)), (1.0, rng.uniform(-32, -20))):
    center = shapes.jitter(rng, (height, spine_y - 5.0, side * 70.0), 4.0)
    semi = np.array((52.0, 22.0, 26.0)) * rng.uniform(0.88, 1.12)
    rotation = (shapes.rotation_about_z(side * rng.uniform(0.4, 0.7))
                @ shapes.rotation_about_y(side * 0.15))
    organ(center, semi, Tissue.KIDNEY_CORTEX, rotation, amplitude=0.03)
    organ(center, semi * 0.7, Tissue.KIDNEY_MEDULLA, rotation, amplitude=0.05)
    sinus_center = center + np.array((0.0, 6.0, -side * 13.0))
    organ(sinus_center, semi * np.array((0.4, 0.4, 0.45)), Tissue.RENAL_SINUS, rotation,
          amplitude=0.1)


def _paint_bowel(tissue, grid, rng, cavity: np.ndarray, texture: np.ndarray, spine_y: float,
                 front_y: float) -> None:
  """Stomach, colon and small bowel loops (the duodenum follows the pancreas it wraps)."""
  # Stomach: left upper quadrant, gas rising to the front above a fluid level.
  stomach_center = shapes.jitter(rng, (48.0, front_y - 32.0, -50.0), 6.0)
  stomach_semi = np.array((50.0, 28.0, 42.0)) * rng.uniform(0.8, 1.15)
  gas_level = stomach_center[1] + stomach_semi[1] * rng.uniform(0.2, 0.9)
  antrum = shapes.Curve.through(
      [stomach_center + (-10, 0, 10), (22.0, front_y - 22.0, -5.0), (24.0, spine_y + 90.0, 28.0)],
      [26.0, 18.0, 12.0])
  field = shapes.CosineField.draw(rng, (40.0, 90.0))
  box, radius = shapes.ellipsoid_radius(grid, stomach_center, stomach_semi, None, field, 0.05)
  if box is not None:
    outer = (radius < 1.0) & cavity[box]
    inner = radius < 1.0 - 4.0 / stomach_semi.min()
    region = tissue[box]
    _, y, _ = grid.coordinates(box)
    region[outer] = Tissue.BOWEL_WALL
    region[inner & outer] = Tissue.BOWEL_FLUID
    region[inner & outer & np.broadcast_to(y > gas_level, inner.shape)] = Tissue.BOWEL_GAS
  _paint_tube(tissue, grid, antrum, Tissue.BOWEL_FLUID, Tissue.BOWEL_WALL, 3.0, cavity,
              gas_above_y=gas_level)

  # Colon (frame of the abdomen, gas and stool) and small bowel loops (fluid, lower abdomen).
  colon = shapes.Curve.through(shapes.jitter(rng, [
      (-140.0, spine_y + 40.0, 95.0), (-40.0, spine_y + 48.0, 92.0),
      (-20.0, front_y - 22.0, 45.0), (-10.0, front_y - 18.0, -40.0),
      (15.0, spine_y + 60.0, -100.0), (-40.0, spine_y + 35.0, -100.0),
      (-140.0, spine_y + 40.0, -98.0)], 6.0), rng.uniform(14, 22, size=7))
  _paint_tube(tissue, grid, colon, Tissue.STOOL, Tissue.BOWEL_WALL, 2.0, cavity,
              texture=texture, gas_texture_level=rng.uniform(-0.6, 0.4))
  for _ in range(int(rng.integers(3, 6))):
    loop = np.column_stack([rng.uniform(-140, -40, 5), spine_y + rng.uniform(50, 115, 5),
                            rng.uniform(-70, 70, 5)])
    _paint_tube(tissue, grid, shapes.Curve.through(loop, rng.uniform(9, 13, 5)),
                Tissue.BOWEL_FLUID, Tissue.BOWEL_WALL, 2.5, cavity, texture=texture,
                gas_texture_level=1.8)


def _paint_duodenum(tissue, grid, rng, cavity: np.ndarray, spine_y: float,
                    pancreas: shapes.Curve) -> None:
  """The C-loop around the pancreatic head, water-filled as in pancreas protocols."""
  neck_zyx, _ = pancreas.point_at(0.38)
  head_zyx = pancreas.points_mm[int(0.12 * len(pancreas.points_mm))]
  duodenum = shapes.Curve.through(shapes.jitter(rng, [
      (24.0, neck_zyx[1] + 20.0, 28.0), (22.0, spine_y + 66.0, 60.0),
      (0.0, spine_y + 52.0, head_zyx[2] + 30.0), (-28.0, spine_y + 46.0, head_zyx[2] + 26.0),
      (-48.0, spine_y + 44.0, 30.0), (-52.0, spine_y + 52.0, -5.0),
      (-40.0, spine_y + 54.0, -35.0), (-22.0, spine_y + 60.0, -45.0)], 3.0),
      rng.uniform(10, 13, size=8))
  _paint_tube(tissue, grid, duodenum, Tissue.BOWEL_FLUID, Tissue.BOWEL_WALL, 2.5, cavity)


def _paint_pancreas(tissue, grid, rng, cavity: np.ndarray, pancreas: shapes.Curve,
                    with_tumour: bool) -> None:
  """The gland with a lobulated outline and, `with_tumour`, a mass in it that may dilate the
  main duct."""
  box, distance, radius, _ = pancreas.tube(grid, margin_mm=8.0)
  lobulation = None
  if box is not None:
    z, y, x = grid.coordinates(box)
    lobulation = shapes.CosineField.draw(rng, (12.0, 30.0))(z, y, x)
    gland = distance <= radius * (1.0 + 0.12 * lobulation)
    shapes.paint(tissue, box, gland & cavity[box], Tissue.PANCREAS)
  else:
    shapes.CosineField.draw(rng, (12.0, 30.0))

  tumour = _draw_tumour(rng, pancreas) if with_tumour else None
  if tumour is not None and box is not None:
    tumour_box, blob = shapes.ellipsoid(grid, tumour['center'], tumour['semi_axes'],
                                        tumour['rotation'], tumour['roughness'], 0.3)
    if tumour_box is not None:
      # Confine the mass to the gland, which it may bulge by a few millimetres.
      bulge_mm = 0.25 * tumour['radius_mm'] + 2.0
      near_gland = np.zeros(tissue.shape, bool)
      near_gland[box] = distance <= radius * (1.0 + 0.12 * lobulation) + bulge_mm
      shapes.paint(tissue, tumour_box, blob & near_gland[tumour_box] & cavity[tumour_box],
                   Tissue.TUMOUR)
    if tumour['duct_dilated']:
      # An obstructing mass dilates the main duct towards the tail.
      start = np.searchsorted(pancreas.arc_mm,
                              pancreas.arc_mm[-1] * tumour['fraction']) + int(
                                  tumour['radius_mm'] / 0.7)
      if start < len(pancreas.arc_mm) - 5:
        duct = shapes.Curve(pancreas.points_mm[start:],
                            np.full(len(pancreas.arc_mm) - start, rng.uniform(2.0, 3.5)),
                            pancreas.arc_mm[start:])
        duct_box, duct_distance, duct_radius, _ = duct.tube(grid)
        if duct_box is not None:
          region = tissue[duct_box]
          region[(duct_distance <= duct_radius) & (region == Tissue.PANCREAS)] = (
              Tissue.PANCREATIC_DUCT)


def _paint_vessels(tissue, grid, rng, spine_y: float, pancreas: shapes.Curve) -> None:
  """Renal veins, aorta and superior mesenteric artery, vena cava and the portal system, painted
  last: they cut through whatever they cross, including the gland and the tumour."""
  aorta_x = rng.uniform(-20, -10)
  caval_x = rng.uniform(18, 28)
  for side, height in ((-1.0, -8.0), (1.0, -24.0)):
    renal_vein = shapes.Curve.through(
        [(height, spine_y + 2.0, side * 52.0),
         (height + 2.0, spine_y + (44.0 if side < 0 else 20.0),
          aorta_x if side < 0 else 0.5 * (caval_x + 52.0)),
         (height + 4.0, spine_y + 28.0, caval_x)], [5.0, 4.0, 5.0])
    _paint_tube(tissue, grid, renal_vein, Tissue.CAVAL_VEIN)

  aorta = shapes.Curve.through(
      [(-400, spine_y + 27.0, aorta_x), (0.0, spine_y + 30.0, aorta_x),
       (400, spine_y + 24.0, aorta_x + 8.0)], [rng.uniform(9.5, 13.0)] * 3)
  _paint_tube(tissue, grid, aorta, Tissue.AORTA)
  sma_top = 12.0 + rng.uniform(-4, 4)
  sma = shapes.Curve.through(
      [(sma_top, spine_y + 38.0, aorta_x), (sma_top - 6.0, spine_y + 50.0, aorta_x + 3.0),
       (-40.0, spine_y + 56.0, aorta_x + 6.0), (-300.0, spine_y + 62.0, aorta_x + 8.0)],
      [4.0, 4.0, 3.8, 3.5])
  _paint_tube(tissue, grid, sma, Tissue.AORTA)
  caval = shapes.Curve.through(
      [(-400, spine_y + 26.0, caval_x), (0.0, spine_y + 28.0, caval_x),
       (400, spine_y + 45.0, caval_x + 8.0)], [rng.uniform(9.0, 12.0)] * 3)
  _paint_tube(tissue, grid, caval, Tissue.CAVAL_VEIN)
  # Portal system: the splenic vein along the back of the gland joins the superior mesenteric
  # vein behind the neck; the portal vein rises to the liver.
  neck_zyx, neck_radius = pancreas.point_at(0.38)
  confluence = neck_zyx + np.array((0.0, -(neck_radius + 5.0), -3.0))
  vein_radius = rng.uniform(6.0, 8.0)
  _paint_tube(tissue, grid, shapes.Curve.through(
      [confluence, confluence + (22.0, -4.0, 18.0), (48.0, spine_y + 58.0, 48.0)],
      [vein_radius] * 3), Tissue.PORTAL_VEIN)
  _paint_tube(tissue, grid, shapes.Curve.through(
      [confluence, confluence + (-30.0, 4.0, 4.0), (-300.0, confluence[1] + 10.0, 12.0)],
      [vein_radius * 0.85] * 3), Tissue.PORTAL_VEIN)
  tail_start = np.searchsorted(pancreas.arc_mm, pancreas.arc_mm[-1] * 0.42)
  behind = pancreas.points_mm[tail_start::8].copy()
  behind[:, 1] -= pancreas.radii_mm[tail_start::8] * 0.8 + 3.5
  behind[:, 0] += 2.0
  splenic = np.concatenate([[confluence], behind, [behind[-1] + (8.0, 0.0, -12.0)]])
  _paint_tube(tissue, grid, shapes.Curve.through(splenic, [4.5] * len(splenic)),
              Tissue.PORTAL_VEIN)


def keep_tumour_touching_gland(tissue: np.ndarray) -> None:
  """Repaint as gland any tumour fragment that vessels cut off from the pancreas."""
  tumour = tissue == Tissue.TUMOUR
  if not tumour.any():
    return
  components, count = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
  gland = (tissue == Tissue.PANCREAS) | (tissue == Tissue.PANCREATIC_DUCT)
  touching = np.unique(components[ndimage.binary_dilation(gland, np.ones((3, 3, 3)))])
  orphan = tumour & ~np.isin(components, touching[touching > 0])
  tissue[orphan] = Tissue.PANCREAS

