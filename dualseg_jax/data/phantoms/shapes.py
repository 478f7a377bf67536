"""Shapes the synthetic anatomy is built from, in patient millimetres (z superior, y anterior,
x the patient's right): the voxel grid, smooth random fields, rough ellipsoids and tubes along
smooth curves."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import interpolate
from scipy import spatial


@dataclasses.dataclass(frozen=True)
class Grid:
  """Voxel centres of a (z, y, x) array in patient millimetres."""

  origin_mm: tuple[float, float, float]  # centre of voxel (0, 0, 0)
  spacing_mm: tuple[float, float, float]
  shape: tuple[int, int, int]

  def box(self, lower_mm, upper_mm) -> tuple[slice, slice, slice] | None:
    """Index slices of the voxels whose centres lie within [lower, upper]; None when empty."""
    slices = []
    for origin, spacing, size, low, high in zip(
        self.origin_mm, self.spacing_mm, self.shape, lower_mm, upper_mm):
      start = max(0, math.ceil((low - origin) / spacing))
      stop = min(size, math.floor((high - origin) / spacing) + 1)
      if stop <= start:
        return None
      slices.append(slice(start, stop))
    return tuple(slices)

  def coordinates(self, box=None):
    """Open (broadcastable) z, y, x coordinate arrays of a box, float32."""
    box = box or tuple(slice(0, n) for n in self.shape)
    axes = []
    for axis, (origin, spacing, index) in enumerate(zip(self.origin_mm, self.spacing_mm, box)):
      values = (origin + spacing * np.arange(index.start, index.stop)).astype(np.float32)
      shape = [1, 1, 1]
      shape[axis] = values.size
      axes.append(values.reshape(shape))
    return axes


@dataclasses.dataclass(frozen=True)
class CosineField:
  """A smooth random field: a sum of plane waves, defined everywhere in patient space."""

  wave_vectors: np.ndarray  # (count, 3) radians per mm, (z, y, x)
  phases: np.ndarray

  @classmethod
  def draw(cls, rng, wavelength_mm: tuple[float, float], count: int = 6) -> 'CosineField':
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, size=(count, 1))
    return cls(2 * np.pi * directions / wavelengths, rng.uniform(0, 2 * np.pi, size=count))

  def __call__(self, z, y, x) -> np.ndarray:
    total = 0.0
    for (kz, ky, kx), phase in zip(self.wave_vectors, self.phases):
      total = total + np.cos(kz * z + ky * y + kx * x + phase)
    # Unit variance: each cosine has variance 1/2.
    return (total * math.sqrt(2.0 / len(self.phases))).astype(np.float32)


def rotation_about_z(angle_rad: float) -> np.ndarray:
  """3x3 rotation in (z, y, x) components, turning the axial plane."""
  cos, sin = math.cos(angle_rad), math.sin(angle_rad)
  return np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])


def rotation_about_y(angle_rad: float) -> np.ndarray:
  """3x3 rotation in (z, y, x) components, tilting within the coronal plane."""
  cos, sin = math.cos(angle_rad), math.sin(angle_rad)
  return np.array([[cos, 0, -sin], [0, 1, 0], [sin, 0, cos]])


def ellipsoid_radius(grid: Grid, center_zyx, semi_axes_zyx, rotation=None, roughness=None,
                     roughness_amplitude=0.0):
  """(box, normalised radius) of a rotated ellipsoid whose surface is perturbed by a smooth
  field: the organ is radius < 1, a shell of it radius in [1 - t, 1)."""
  center = np.asarray(center_zyx, float)
  semi = np.asarray(semi_axes_zyx, float)
  # A unit-variance CosineField of n waves never exceeds sqrt(2 n).
  reach = semi.max() * (1.0 + roughness_amplitude * (
      math.sqrt(2 * len(roughness.phases)) if roughness is not None else 0.0))
  box = grid.box(center - reach, center + reach)
  if box is None:
    return None, None
  z, y, x = grid.coordinates(box)
  offsets = (z - center[0], y - center[1], x - center[2])
  if rotation is not None:
    # Local coordinates: R^T (p - c).
    offsets = tuple(sum(rotation[row, axis] * offsets[row] for row in range(3))
                    for axis in range(3))
  radius_sq = sum((offset / s) ** 2 for offset, s in zip(offsets, semi))
  radius = np.sqrt(np.broadcast_to(radius_sq, tuple(s.stop - s.start for s in box)))
  if roughness is not None and roughness_amplitude > 0:
    radius = radius + roughness_amplitude * roughness(z, y, x)
  return box, radius


def ellipsoid(grid: Grid, center_zyx, semi_axes_zyx, rotation=None, roughness=None,
              roughness_amplitude=0.0):
  """(box, mask) of a rotated ellipsoid whose surface is perturbed by a smooth field."""
  box, radius = ellipsoid_radius(grid, center_zyx, semi_axes_zyx, rotation, roughness,
                                 roughness_amplitude)
  return (None, None) if box is None else (box, radius < 1.0)


@dataclasses.dataclass(frozen=True)
class Curve:
  """A smooth 3D centreline sampled densely, with a radius at every sample."""

  points_mm: np.ndarray  # (n, 3) in (z, y, x)
  radii_mm: np.ndarray  # (n,)
  arc_mm: np.ndarray  # (n,) cumulative length

  @classmethod
  def through(cls, control_points_zyx, control_radii_mm, step_mm: float = 0.7) -> 'Curve':
    control = np.asarray(control_points_zyx, float)
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(control, axis=0), axis=1))])
    spline = interpolate.make_interp_spline(chord, control, k=min(3, len(control) - 1))
    samples = np.linspace(0.0, chord[-1], max(2, int(chord[-1] / step_mm) + 1))
    points = spline(samples)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    radii = np.interp(samples, chord, np.asarray(control_radii_mm, float))
    return cls(points, radii, arc)

  def tube(self, grid: Grid, margin_mm: float = 0.0):
    """(box, distance to the centreline, radius of the nearest sample, index of that sample)."""
    reach = self.radii_mm.max() + margin_mm + 1.0
    box = grid.box(self.points_mm.min(0) - reach, self.points_mm.max(0) + reach)
    if box is None:
      return None, None, None, None
    z, y, x = grid.coordinates(box)
    shape = tuple(s.stop - s.start for s in box)
    query = np.stack([np.broadcast_to(c, shape).ravel() for c in (z, y, x)], axis=1)
    distance, nearest = spatial.cKDTree(self.points_mm).query(query, distance_upper_bound=reach)
    outside = ~np.isfinite(distance)
    nearest = np.where(outside, 0, nearest)
    distance = np.where(outside, np.inf, distance)
    return (box, distance.reshape(shape), self.radii_mm[nearest].reshape(shape),
            nearest.reshape(shape))

  def point_at(self, fraction: float) -> tuple[np.ndarray, float]:
    index = int(np.clip(fraction, 0, 1) * (len(self.arc_mm) - 1))
    return self.points_mm[index], float(self.radii_mm[index])


def paint(tissue: np.ndarray, box, mask, value) -> None:
  """Sets the voxels of `mask` within `box` (nothing when the shape missed the grid)."""
  if box is not None:
    region = tissue[box]
    region[mask] = value


def jitter(rng, points, amount_mm: float) -> np.ndarray:
  """Each coordinate moved by a uniform draw in [-amount_mm, amount_mm]."""
  points = np.asarray(points, float)
  return points + rng.uniform(-amount_mm, amount_mm, size=points.shape)

