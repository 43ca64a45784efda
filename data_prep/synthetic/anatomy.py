"""Analytic chest anatomy for the synthetic LIDC-IDRI phantom.

Every shape is a function of normalized coordinates, so the same code answers "is this pixel lung?"
for a whole axial slice and for a batch of 3D points:

* ``u = (col - cx) / half``: patient right (-1) to patient left (+1), i.e. world +x;
* ``v = (row - cy) / half``: anterior (-1) to posterior (+1), i.e. world +y;
* ``t = (z - z_min) / (z_max - z_min)``: 0 at the inferior end of the scan, 1 at its superior end,

where ``half`` is half the image width in pixels and ``z_min``, ``z_max`` span the *full* scan, so the
lungs fill most of any scan, the trachea its top part and the heart its lower half. In millimetres,
``X = u * half_width_mm``, ``Y = v * half_width_mm``, ``Z = z``: the frame in which
:mod:`data_prep.synthetic.trees` grows the airways and vessels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["ChestAnatomy", "ellipse_q"]

BODY_GROWTH_STEP = 1.01  # widened_to_hold grows the body by this factor per step ...
BODY_GROWTH_MAX = 1.5  # ... up to this factor per axis

# Body layers, as fractions of the skin superellipse "radius" rho (1 = skin; see body_rho_p).
BODY_EXPONENT = 2.4
MUSCLE_OUTER = 0.93  # subcutaneous fat between here and the skin
RIB_OUTER = 0.865  # ribs and intercostal muscle between CAVITY and here
CAVITY = 0.80  # pleural cavity (lungs, mediastinum, upper abdomen) inside
LUNG_APEX_START = 0.78  # t above which the lungs taper to their apex ...
LUNG_APEX_END = 0.985  # ... which is here
SPINE_V = 0.45  # vertebral body centre
PARASPINAL_U, PARASPINAL_V = 0.17, 0.68
AORTA_DESC_UV = (0.12, 0.33)
AORTA_ASC_UV = (-0.06, -0.08)
ARCH_T = 0.74  # aortic arch height
TRACHEA_UV = (0.0, 0.14)
HEART_HALF_T = 0.18  # the heart spans heart_t +- this
HEART_TILT = np.pi / 6  # long axis turned towards the left-anterior


def ellipse_q(u, v, uc, vc, au, av):
    """Squared normalized ellipse radius: < 1 inside."""
    return ((u - uc) / au) ** 2 + ((v - vc) / av) ** 2


def _neck_taper(t):
    """Factor on the body's half-width at relative height t: 1, narrowing by 5 % towards the neck."""
    return 1.0 - 0.05 * np.clip((np.asarray(t) - 0.85) / 0.15, 0.0, 1.0)


def _capsule_distance(u, v, p0, p1):
    """Distance of (u, v) to the 2D segment p0-p1 (same units)."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    s = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - p0[0] - s * du, v - p0[1] - s * dv)


@dataclass(frozen=True)
class ChestAnatomy:
    """Patient-specific parameters of the analytic chest, with its shape functions.

    Args:
        z_min: inferior end of the full scan (world z, mm).
        z_max: superior end of the full scan (world z, mm).
        half_width_mm: millimetres per unit of ``u`` and ``v`` (half the image width).
        body_a: skin half-width (u units).
        body_b: skin half-depth (v units).
        body_v: skin centre in v.
        heart_u: heart centre in u (positive = patient left).
        heart_v: heart centre in v.
        heart_t: heart centre height; it spans ``heart_t +- 0.18``.
        dome_right: height (t) of the top of the right diaphragm dome.
        dome_left: height (t) of the top of the left diaphragm dome.
        carina_t: height (t) of the tracheal bifurcation.
    """

    z_min: float
    z_max: float
    half_width_mm: float
    body_a: float = 0.98
    body_b: float = 0.70
    body_v: float = 0.08
    heart_u: float = 0.08
    heart_v: float = -0.13
    heart_t: float = 0.33
    dome_right: float = 0.33
    dome_left: float = 0.29
    carina_t: float = 0.70

    @classmethod
    def sample(cls, rng: np.random.Generator, z_min: float, z_max: float, half_width_mm: float) -> ChestAnatomy:
        """Default anatomy with a few percent of random, patient-to-patient variation.

        Args:
            rng: random generator (the only source of variation).
            z_min: inferior end of the full scan (mm).
            z_max: superior end of the full scan (mm).
            half_width_mm: millimetres per normalized unit.
        """
        j = rng.uniform(-1.0, 1.0, size=8)
        return cls(
            z_min=float(z_min),
            z_max=float(max(z_max, z_min + 1.0)),
            half_width_mm=float(half_width_mm),
            body_a=0.98 + 0.015 * j[0],
            body_b=0.70 + 0.02 * j[1],
            heart_u=0.08 + 0.03 * j[2],
            heart_v=-0.13 + 0.02 * j[3],
            heart_t=0.33 + 0.03 * j[4],
            dome_right=0.33 + 0.03 * j[5],
            dome_left=0.29 + 0.03 * j[6],
            carina_t=0.70 + 0.03 * j[7],
        )

    def widened_to_hold(self, u, v, t, limit: float = CAVITY) -> ChestAnatomy:
        """This anatomy with the body grown until every point (u, v, t) lies inside ``limit``.

        Nodule outlines come from real patients, whose chests are not the phantom's: drawn where
        the phantom has chest-wall muscle, a solid nodule is invisible (+40 HU in +45 HU) and still
        labelled. Growing the body (and so the pleural cavity, ribs and lungs with it) puts the
        outline back inside the chest. The axis that holds the outermost point back grows by
        ``BODY_GROWTH_STEP`` at a time (both when their terms are within 30 % of each other), at most
        ``BODY_GROWTH_MAX`` times; a body that already holds every point is returned unchanged.

        Args:
            u: normalized left-right coordinates of the points (array).
            v: normalized anterior-posterior coordinates (array, same shape).
            t: relative heights (array, same shape).
            limit: body-layer radius (``CAVITY``: inside the pleural cavity) the points must be inside.
        """
        u, v, t = (np.asarray(x, dtype=np.float64).ravel() for x in (u, v, t))
        if u.size == 0:
            return self
        au, bv = np.abs(u) / _neck_taper(t), np.abs(v - self.body_v)
        a, b, bound = self.body_a, self.body_b, limit**BODY_EXPONENT
        while True:
            terms_u, terms_v = (au / a) ** BODY_EXPONENT, (bv / b) ** BODY_EXPONENT
            worst = int(np.argmax(terms_u + terms_v))
            tu, tv = terms_u[worst], terms_v[worst]
            grow_a = tu >= 0.7 * tv and a < self.body_a * BODY_GROWTH_MAX
            grow_b = tv >= 0.7 * tu and b < self.body_b * BODY_GROWTH_MAX
            if tu + tv < bound or not (grow_a or grow_b):
                break
            a, b = a * (BODY_GROWTH_STEP if grow_a else 1.0), b * (BODY_GROWTH_STEP if grow_b else 1.0)
        return self if (a, b) == (self.body_a, self.body_b) else replace(self, body_a=float(a), body_b=float(b))

    # ---- coordinates -------------------------------------------------------------------------
    def t_of(self, z):
        """Relative height t of world z (mm)."""
        return (np.asarray(z, dtype=np.float64) - self.z_min) / (self.z_max - self.z_min)

    def z_of(self, t):
        """World z (mm) of relative height t."""
        return self.z_min + np.asarray(t, dtype=np.float64) * (self.z_max - self.z_min)

    def to_mm(self, u, v, t) -> np.ndarray:
        """(X, Y, Z) millimetres of normalized (u, v, t); last axis of the result is (x, y, z)."""
        return np.stack(np.broadcast_arrays(u * self.half_width_mm, v * self.half_width_mm, self.z_of(t)), -1)

    # ---- shapes (u, v, t broadcast together) --------------------------------------------------
    def static_fields(self, u, v) -> dict[str, np.ndarray]:
        """Everything of the shapes that does not depend on t, for a grid of (u, v).

        Compute it once per grid and pass it to the shape methods: only the t-dependent
        comparisons are then left per slice.
        """
        c, s = np.cos(HEART_TILT), np.sin(HEART_TILT)
        cu, cv = u - self.heart_u, v - self.heart_v
        return {
            "u_pow": np.abs(u) ** BODY_EXPONENT,
            "v_pow": np.abs(v - self.body_v) ** BODY_EXPONENT,
            "dome": self.dome_t(u, v),
            "apex_q": ellipse_q(np.abs(u), v, 0.45, 0.12, 0.52, 0.66),
            "mediastinum_margin": np.abs(u) - 0.05 - 0.09 * np.exp(-(((v - 0.25) / 0.35) ** 2)),
            "heart_q0": ((c * cu - s * cv) / 0.34) ** 2 + ((s * cu + c * cv) / 0.26) ** 2,
            "aorta_desc": ellipse_q(u, v, *AORTA_DESC_UV, 0.065, 0.065) < 1,
            "aorta_asc": ellipse_q(u, v, *AORTA_ASC_UV, 0.075, 0.075) < 1,
            "aorta_arch": _capsule_distance(u, v, AORTA_ASC_UV, AORTA_DESC_UV) < 0.06,
            "paraspinal": ellipse_q(np.abs(u), v, PARASPINAL_U, PARASPINAL_V, 0.14, 0.09) < 1,
            "vertebra_q": ellipse_q(u, v, 0.0, SPINE_V, 0.125, 0.11),
        }

    def body_rho_p(self, u, v, t, static: dict | None = None):
        """Skin superellipse radius to the power BODY_EXPONENT: < 1 inside the body.

        Body layers are at ``MUSCLE_OUTER``, ``RIB_OUTER`` and ``CAVITY`` (to the same power).
        """
        s = static if static is not None else self.static_fields(u, v)
        return s["u_pow"] / (self.body_a * _neck_taper(t)) ** BODY_EXPONENT + s["v_pow"] / self.body_b**BODY_EXPONENT

    def has_heart(self, t) -> bool:
        """Whether the heart may appear at height(s) t."""
        return bool(np.any(np.abs(np.asarray(t) - self.heart_t) < HEART_HALF_T))

    def heart_q(self, u, v, t, static: dict | None = None):
        """Heart ellipsoid (tilted towards the left-anterior): < 1 inside."""
        s = static if static is not None else self.static_fields(u, v)
        scale2 = np.clip(1.0 - ((np.asarray(t) - self.heart_t) / HEART_HALF_T) ** 2, 0.0, None)
        return s["heart_q0"] / (scale2 + 1e-12)

    def dome_t(self, u, v):
        """Height (t) of the diaphragm under (u, v): lungs lie above it, abdomen below."""
        top = np.where(u < 0, self.dome_right, self.dome_left)
        r2 = ((np.abs(u) - 0.40) / 0.48) ** 2 + (v / 0.58) ** 2
        return np.maximum(top - 0.22 * r2 - 0.10 * np.clip(v, 0.0, None), 0.02)

    def aorta(self, u, v, t, static: dict | None = None):
        """Ascending aorta, arch and descending aorta (boolean)."""
        s = static if static is not None else self.static_fields(u, v)
        t = np.asarray(t)
        out = s["aorta_desc"] & (t < ARCH_T)
        asc = (t > self.heart_t + 0.1) & (t < ARCH_T)
        if np.any(asc):
            out = out | (s["aorta_asc"] & asc)
        near_arch = np.abs(t - ARCH_T) < 0.03
        if np.any(near_arch):
            out = out | (s["aorta_arch"] & near_arch)
        return out

    def lung_field(self, u, v, t, static: dict | None = None, rho_p=None):
        """Both lungs (boolean): pleural cavity minus mediastinum, heart, aorta, spine, below-diaphragm.

        Args:
            u: normalized left-right coordinate (array).
            v: normalized anterior-posterior coordinate (array).
            t: relative height (scalar or array broadcastable with u, v).
            static: :meth:`static_fields` of (u, v), to save time on repeated calls.
            rho_p: :meth:`body_rho_p` of (u, v, t), likewise.
        """
        s = static if static is not None else self.static_fields(u, v)
        t = np.asarray(t)
        if rho_p is None:
            rho_p = self.body_rho_p(u, v, t, s)
        apex2 = np.clip(1.0 - ((t - LUNG_APEX_START) / (LUNG_APEX_END - LUNG_APEX_START)) ** 2, 0.0, 1.0)
        apex2 = np.where(t < LUNG_APEX_START, 1.0, apex2)
        lung = (rho_p < CAVITY**BODY_EXPONENT) & (t > s["dome"]) & (s["apex_q"] < apex2)
        lung &= s["mediastinum_margin"] > 0.04 * np.clip((t - 0.6) / 0.2, 0.0, 1.0)  # wider up top
        if self.has_heart(t):
            lung &= self.heart_q(u, v, t, s) > 1.12**2
        lung &= ~self.aorta(u, v, t, s) & ~s["paraspinal"] & (s["vertebra_q"] > 1.3)
        return lung

    def lung_contains_mm(self, xyz: np.ndarray) -> np.ndarray:
        """lung_field for points in millimetres, ``xyz`` (..., 3) as (X, Y, Z)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        h = self.half_width_mm
        return self.lung_field(xyz[..., 0] / h, xyz[..., 1] / h, self.t_of(xyz[..., 2]))
