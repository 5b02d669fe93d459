"""Marching Cubes 33 case tables, generated from the trilinear interpolant (Chernyaev 1995; Lewiner et al. 2003).

Nothing here is transcribed from another implementation: the triangulation of every case is *derived* by tracing the
isosurface of the trilinear interpolant of one cube, and the generator is the proof that the tables are right
(``tests/test_mc33.py`` checks every reachable case against a dense sampling of the interpolant).

Cube layout (reference §4.2): corner ``k = x + 2y + 4z`` sits at ``(x, y, z) ∈ {0, 1}³``; inside ⇔ value > 0 (a value
of exactly 0 counts as outside). Edge ``e = 4·axis + o`` runs along ``axis`` from its base corner (axis bit 0), with
``o = u + 2w`` the coordinates on the two other axes in increasing axis order.

What decides the topology (all of it is exact for the trilinear interpolant):

1. **Face tests.** On a face whose corner signs alternate, the bilinear interpolant has a saddle; its two positive
   corners are joined across the face iff ``|product of the positive diagonal| > |product of the negative diagonal|``
   (the asymptotic decider: the saddle value ``(ac − bd)/(a + c − b − d)`` has the sign of that difference). One bit
   per face; it fixes the contour segments on the face, hence closed polygons ("loops") on the cube surface, which
   split the surface into positive and negative regions.
2. **Interior test.** Sweep the cube with planes ``z = t``. Each slice is bilinear with corner values linear in ``t``
   (the four z-edges). Every positive component of a slice touches a slice corner (a bilinear function has no
   interior extremum), so the positive set of the whole cube is connected exactly as the z-edges' positive intervals
   are joined slice by slice: adjacent z-edges whenever both are positive at one ``t`` (this is already the side face's
   connectivity), diagonal z-edges when, at some ``t`` where they are positive and the two others negative, the slice's
   decider ``q(t) = v₀(t)v₂(t) − v₁(t)v₃(t)`` says so. ``q`` is quadratic in ``t``, so each of the four diagonal
   connections (positive 0–2, positive 1–3, negative 0–2, negative 1–3) is one bit: the sign of the max/min of ``q``
   on an interval. This is Lewiner et al.'s plane test, generalised to every configuration at once.
3. **Surface pieces.** The surface inside the cube separates the cube into ``#positive + #negative`` components, one
   more than its number of pieces; each piece is a disk bounded by one loop, except that two same-sign regions joined
   through the interior (step 2) but not on the surface are joined by a tube: an annulus between the two loops that
   bound the region between them (MC33 cases 4.1.2, 6.1.2, 7.4.2, 10.1.2, 12.1.2, 13.5.2, ...).

A table key is ``config | face_bits << 8 | interior_bits << 14`` (18 bits). Triangles use local vertex ids 0–11 (the
zero crossing on edge ``e``) and 12–15 (interior vertices, each the mean of some of the cube's crossings): loops of
more than ``FAN_MAX`` vertices, or with no allowed fan, are fanned around one; a tube whose loops share faces goes
through one or a ring of three. No triangle edge joins two crossings on one cube face unless it is that face's contour
segment: the neighbouring cube holds both vertices too, and such an edge could end up in four triangles.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

N_KEYS = 1 << 18
# Loops with at most this many vertices are fanned from one of their vertices; longer ones around an interior vertex.
FAN_MAX = 6
MAX_CENTERS = 4


def _corner_pos(k: int) -> tuple[float, float, float]:
    return (float(k & 1), float((k >> 1) & 1), float((k >> 2) & 1))


def _sub(a: tuple, b: tuple) -> tuple:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _dot(a: tuple, b: tuple) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: tuple, b: tuple) -> tuple:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _build_edges() -> list[tuple[int, int]]:
    edges = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for o in range(4):
            coords = [0, 0, 0]
            coords[others[0]] = o & 1
            coords[others[1]] = o >> 1
            c0 = coords[0] + 2 * coords[1] + 4 * coords[2]
            edges.append((c0, c0 + (1 << axis)))
    return edges


# EDGES[e] = (base corner, far corner)
EDGES: list[tuple[int, int]] = _build_edges()
_EDGE_OF = {frozenset(e): i for i, e in enumerate(EDGES)}


def _build_faces() -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Faces ``f = 2·axis + side`` as (axis, side, 4 corners in cyclic order)."""
    faces = []
    for axis in range(3):
        u, w = [a for a in range(3) if a != axis]
        for side in range(2):
            cyc = []
            for cu, cw in ((0, 0), (1, 0), (1, 1), (0, 1)):
                coords = [0, 0, 0]
                coords[axis], coords[u], coords[w] = side, cu, cw
                cyc.append(coords[0] + 2 * coords[1] + 4 * coords[2])
            faces.append((axis, side, tuple(cyc)))
    return faces


FACES = _build_faces()
# [6, 4] corners of each face in cyclic order (the runtime face test uses the same order).
FACE_CORNERS = np.array([f[2] for f in FACES], dtype=np.int64)
# The four z-edges in cyclic order around the square, (x, y) = (0,0), (1,0), (1,1), (0,1): bottom and top corners.
ZEDGE_BOTTOM = np.array([0, 1, 3, 2], dtype=np.int64)
ZEDGE_TOP = ZEDGE_BOTTOM + 4
# Interior bits (after the 8 config bits and 6 face bits).
BIT_P02, BIT_P13, BIT_N02, BIT_N13 = 0, 1, 2, 3


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def face_ambiguous(config: int, face: int) -> bool:
    """Whether the corner signs alternate around ``face`` (a saddle on the face: the face test applies)."""
    s = [(config >> c) & 1 for c in FACES[face][2]]
    return s[0] == s[2] and s[1] == s[3] and s[0] != s[1]


def interior_bits_possible(config: int) -> int:
    """Bit mask of the interior bits that can be set for ``config`` (each needs a z-edge sign pattern at one ``t``)."""
    inside = [(config >> c) & 1 for c in range(8)]
    has_pos = [inside[b] or inside[t] for b, t in zip(ZEDGE_BOTTOM, ZEDGE_TOP)]
    has_neg = [(not inside[b]) or (not inside[t]) for b, t in zip(ZEDGE_BOTTOM, ZEDGE_TOP)]
    mask = 0
    if has_pos[0] and has_pos[2] and has_neg[1] and has_neg[3]:  # slices with 0, 2 positive and 1, 3 negative
        mask |= (1 << BIT_P02) | (1 << BIT_N13)
    if has_neg[0] and has_neg[2] and has_pos[1] and has_pos[3]:
        mask |= (1 << BIT_P13) | (1 << BIT_N02)
    return mask


@dataclass
class CubeTopology:
    """What the generator derives for one key: loops on the cube surface, regions, interior classes, pieces."""

    loops: list[list[int]]  # oriented loops of crossed edges
    region_of_corner: list[int]  # surface region id of each corner
    class_of_corner: list[int]  # component id (within the closed cube) of each corner, by sign
    tubes: list[tuple[int, int]]  # pairs of loop indices joined by an annulus
    supported: bool  # False: interior classes that no disks-and-tubes surface realises (unreachable keys)


# Edge midpoints: representative vertex positions for the purely combinatorial choices of the generator.
_MID = [tuple((pa + pb) / 2 for pa, pb in zip(_corner_pos(a), _corner_pos(b))) for a, b in EDGES]


@lru_cache(maxsize=None)
def _face_segments(config: int, face_bits: int) -> list[tuple[int, int]]:
    """Oriented contour segments (edge u → edge v) on all faces, surface normal toward the negative side."""
    inside = [(config >> c) & 1 for c in range(8)]
    mid = _MID
    segments = []
    for f, (axis, side, cyc) in enumerate(FACES):
        nu = [0.0, 0.0, 0.0]
        nu[axis] = 1.0 if side else -1.0  # outward face normal
        side_edges = [_EDGE_OF[frozenset((cyc[i], cyc[(i + 1) % 4]))] for i in range(4)]
        crossed = [e for e in side_edges if inside[EDGES[e][0]] != inside[EDGES[e][1]]]
        if len(crossed) == 2:
            pairs = [tuple(crossed)]
        elif len(crossed) == 4:
            # Ambiguous face: cut off the corners of the sign that is *not* joined across the face.
            pos_joined = bool((face_bits >> f) & 1)
            cut_sign = 0 if pos_joined else 1
            pairs = [
                (side_edges[(i - 1) % 4], side_edges[i]) for i in range(4) if inside[cyc[i]] == cut_sign
            ]
        else:
            pairs = []
        for u, v in pairs:
            a, b = EDGES[u]
            p_u, n_u = (a, b) if inside[a] else (b, a)
            n = _sub(_corner_pos(n_u), _corner_pos(p_u))  # in-face normal of the surface at u: toward the negative end
            # Stokes: walking along the boundary with the head along n, the surface (inside the cube, −ν) is on
            # the left, so the boundary runs along n × ν.
            if _dot(_sub(mid[v], mid[u]), _cross(n, tuple(nu))) > 0:
                segments.append((u, v))
            else:
                segments.append((v, u))
    return segments


def cube_topology(config: int, face_bits: int, interior_bits: int) -> CubeTopology:
    """Derive loops, surface regions, interior components and tubes for one table key (see the module docstring)."""
    inside = [(config >> c) & 1 for c in range(8)]
    segments = _face_segments(config, face_bits)
    nxt: dict[int, int] = {}
    for u, v in segments:
        if u in nxt:
            raise AssertionError(f"config {config}: edge {u} starts two segments")
        nxt[u] = v
    if sorted(nxt) != sorted(nxt.values()):
        raise AssertionError(f"config {config}: segments do not close into loops")
    loops, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, e = [], start
        while e not in seen:
            seen.add(e)
            loop.append(e)
            e = nxt[e]
        loops.append(loop)

    # Surface regions: corners joined along cube edges of one sign, and across faces as the face tests say.
    surf = _UnionFind(8)
    for a, b in EDGES:
        if inside[a] == inside[b]:
            surf.union(a, b)
    for f, (_, _, cyc) in enumerate(FACES):
        if face_ambiguous(config, f):
            pos_joined = bool((face_bits >> f) & 1)
            i = 0 if inside[cyc[0]] == pos_joined else 1
            surf.union(cyc[i], cyc[i + 2])
    region_of_corner = [surf.find(c) for c in range(8)]

    # Interior components: the surface joins plus the slice-diagonal joins of the z-sweep.
    cls = _UnionFind(8)
    for c in range(8):
        cls.union(c, region_of_corner[c])

    def join_diag(i: int, j: int, sign: int) -> None:
        ci = [c for c in (ZEDGE_BOTTOM[i], ZEDGE_TOP[i]) if inside[c] == sign]
        cj = [c for c in (ZEDGE_BOTTOM[j], ZEDGE_TOP[j]) if inside[c] == sign]
        cls.union(int(ci[0]), int(cj[0]))

    if (interior_bits >> BIT_P02) & 1:
        join_diag(0, 2, 1)
    if (interior_bits >> BIT_P13) & 1:
        join_diag(1, 3, 1)
    if (interior_bits >> BIT_N02) & 1:
        join_diag(0, 2, 0)
    if (interior_bits >> BIT_N13) & 1:
        join_diag(1, 3, 0)
    class_of_corner = [cls.find(c) for c in range(8)]

    # Which loop separates which two regions.
    loop_regions = []
    for loop in loops:
        pairs = set()
        for e in loop:
            a, b = EDGES[e]
            p, n = (a, b) if inside[a] else (b, a)
            pairs.add((region_of_corner[p], region_of_corner[n]))
        if len(pairs) != 1:
            raise AssertionError(f"config {config}: loop {loop} borders more than two regions")
        loop_regions.append(pairs.pop())

    # Tubes: an interior class holding two surface regions R1, R2 that border one region M between them.
    tubes, supported = [], True
    classes = sorted(set(class_of_corner))
    for k in classes:
        members = sorted({region_of_corner[c] for c in range(8) if class_of_corner[c] == k})
        if len(members) == 1:
            continue
        if len(members) > 2:
            supported = False
            continue
        r1, r2 = members
        l1 = {i: (lr[1] if lr[0] == r1 else lr[0]) for i, lr in enumerate(loop_regions) if r1 in lr}
        l2 = {i: (lr[1] if lr[0] == r2 else lr[0]) for i, lr in enumerate(loop_regions) if r2 in lr}
        common = [(i, j) for i, m in l1.items() for j, m2 in l2.items() if m == m2]
        if len(common) != 1:
            supported = False
            continue
        tubes.append(common[0])
    # Each piece separates the cube once more: #components = 1 + #pieces = 1 + #loops − #tubes.
    used = [i for t in tubes for i in t]
    if len(set(used)) != len(used) or len(classes) != 1 + len(loops) - len(tubes):
        supported = False
    if not supported:
        tubes = []
    return CubeTopology(loops, region_of_corner, class_of_corner, tubes, supported)


# Faces each edge lies on. Two crossings on one face can also be two vertices of the neighbouring cube, so a chord or
# rung between them would be an edge of both cubes' triangulations (four faces on one edge): never use one.
_EDGE_FACES = [frozenset(f for f, (_, _, cyc) in enumerate(FACES) if a in cyc and b in cyc) for a, b in EDGES]


def _may_join(u: int, v: int) -> bool:
    """Whether a triangle edge may join local vertices ``u`` and ``v`` (interior vertices ≥ 12 always may)."""
    return u >= 12 or v >= 12 or not (_EDGE_FACES[u] & _EDGE_FACES[v])


def _pos(v: int, centers: list[list[int]]) -> np.ndarray:
    """Representative position of local vertex ``v``: an edge midpoint, or the mean of an interior vertex's edges."""
    if v < 12:
        return np.array(_MID[v])
    return np.mean([_MID[e] for e in centers[v - 12]], axis=0)


def _dist(u: int, v: int, centers: list[list[int]] | None = None) -> float:
    return float(np.linalg.norm(_pos(u, centers or []) - _pos(v, centers or [])))


def _disk(loop: list[int], centers: list[list[int]]) -> list[tuple[int, int, int]]:
    """Triangulate a loop bounding a disk, keeping its orientation (so normals point to the negative side)."""
    m = len(loop)
    if m <= FAN_MAX:
        # Fan (p_k, p_k+j, p_k+j+1) from the apex whose chords are allowed and shortest.
        best = None
        for k in range(m):
            chords = [(loop[k], loop[(k + j) % m]) for j in range(2, m - 1)]
            if all(_may_join(u, v) for u, v in chords):
                cost = sum(_dist(u, v) for u, v in chords)
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, k)
        if best is not None:
            k = best[1]
            return [(loop[k], loop[(k + j) % m], loop[(k + j + 1) % m]) for j in range(1, m - 1)]
    # Around an interior vertex (the mean of the loop's crossings): long loops and loops with no allowed fan.
    c = 12 + len(centers)
    centers.append(sorted(loop))
    return [(c, loop[j], loop[(j + 1) % m]) for j in range(m)]


def _tube(p: list[int], q: list[int], centers: list[list[int]]) -> list[tuple[int, int, int]]:
    """Triangulate the annulus between loops ``p`` and ``q`` (a strip of rungs p_a–q_b).

    As boundaries of one annulus the loops run opposite ways: the strip goes forward along ``p`` and backward along
    ``q``; each step adds (p_a, p_a+1, q_b) or (q_b−1, q_b, p_a). Among all starting rungs and step orders, take the
    one of least total rung length whose rungs are all allowed (dynamic programming over the (steps p, steps q) grid).
    Every rung must be used once: a run of all ``n`` p-steps (or all ``m`` q-steps) would come back to a rung already
    used, so each strip starts with one p-step then one q-step (any valid strip has such a place to start) and never
    visits (1, m), the only other state where that could happen.
    When no strip has only allowed rungs (loops sharing several faces), see :func:`_tube_around_center`.
    """
    n, m = len(p), len(q)
    best = None
    inf = float("inf")
    for i0, j0 in itertools.product(range(n), range(m)):
        def rung(up: int, uq: int) -> tuple[int, int]:
            return p[(i0 + up) % n], q[(j0 - uq) % m]

        if not all(_may_join(*rung(*s)) for s in ((0, 0), (1, 0), (1, 1))):
            continue
        cost = [[inf] * (m + 1) for _ in range(n + 1)]
        back: dict[tuple[int, int], tuple[int, int]] = {(1, 0): (0, 0), (1, 1): (1, 0)}
        cost[1][1] = sum(_dist(*rung(*s), centers) for s in ((0, 0), (1, 0), (1, 1)))
        for up in range(1, n + 1):
            for uq in range(1, m + 1):
                if cost[up][uq] == inf:
                    continue
                for dp, dq in ((1, 0), (0, 1)):
                    a, b = up + dp, uq + dq
                    if a > n or b > m or (a, b) == (1, m):
                        continue
                    u, v = rung(a, b)
                    if not _may_join(u, v):
                        continue
                    c = cost[up][uq] + _dist(u, v, centers)
                    if c < cost[a][b] - 1e-9:
                        cost[a][b] = c
                        back[(a, b)] = (up, uq)
        if cost[n][m] < inf and (best is None or cost[n][m] < best[0] - 1e-9):
            best = (cost[n][m], i0, j0, back)
    if best is None:
        if any(v >= 12 for v in p + q):
            raise AssertionError(f"no strip between loops {p} and {q}")
        return _tube_around_center(p, q, centers)
    _, i0, j0, back = best
    path = [(n, m)]
    while path[-1] != (0, 0):
        path.append(back[path[-1]])
    path.reverse()
    tris = []
    for (up, uq), (a, b) in zip(path, path[1:]):
        pa, qb = p[(i0 + up) % n], q[(j0 - uq) % m]
        if a > up:
            tris.append((pa, p[(i0 + up + 1) % n], qb))
        else:
            tris.append((q[(j0 - uq - 1) % m], qb, pa))
    return tris


def _tube_around_center(p: list[int], q: list[int], centers: list[list[int]]) -> list[tuple[int, int, int]]:
    """Annulus between loops ``p`` and ``q`` with one interior vertex (the mean of both loops' crossings).

    Two strip steps make a quad on the edges p_a→p_a+1 and q_b−1→q_b (three p–q edges, all allowed); cutting the
    annulus there leaves a disk bounded by [p_a+1, ..., p_a, q_b, ..., q_b−1], fanned around the interior vertex.
    """
    n, m = len(p), len(q)
    best = None
    for a, b, diag in itertools.product(range(n), range(m), range(2)):
        pa, pa1, qb, qb1 = p[a], p[(a + 1) % n], q[b], q[(b - 1) % m]
        cross = [(pa, qb), (pa1, qb1), (pa1, qb) if diag == 0 else (pa, qb1)]
        if all(_may_join(u, v) for u, v in cross):
            cost = sum(_dist(u, v) for u, v in cross)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, a, b, diag)
    if best is None:
        return _tube_through_ring(p, q, centers)
    _, a, b, diag = best
    pa, pa1, qb, qb1 = p[a], p[(a + 1) % n], q[b], q[(b - 1) % m]
    if diag == 0:  # advance p, then q: diagonal p_a+1–q_b
        tris = [(pa, pa1, qb), (qb1, qb, pa1)]
    else:  # advance q, then p: diagonal p_a–q_b−1
        tris = [(qb1, qb, pa), (pa, pa1, qb1)]
    ring = [p[(a + 1 + k) % n] for k in range(n)] + [q[(b + k) % m] for k in range(m)]
    c = 12 + len(centers)
    centers.append(sorted(p + q))
    return tris + [(c, ring[k], ring[(k + 1) % len(ring)]) for k in range(len(ring))]


def _tube_through_ring(p: list[int], q: list[int], centers: list[list[int]]) -> list[tuple[int, int, int]]:
    """Annulus between loops ``p`` and ``q`` through a ring of three interior vertices (no p–q edge at all).

    For loops that share so many faces that every p–q edge is forbidden (e.g. a corner triangle inside a hexagon).
    ``p`` is cut into three arcs and ``q`` (walked backward, which runs alongside ``p``) into three matching arcs;
    ring vertex ``k`` is the mean of the crossings of arc pair ``k``; then two strips: p–ring and ring–q.
    """
    n, m = len(p), len(q)
    p_arcs = [p[k * n // 3 : (k + 1) * n // 3] for k in range(3)]

    def q_arcs(shift: int) -> list[list[int]]:
        back = [q[(shift - k) % m] for k in range(m)]
        return [back[k * m // 3 : (k + 1) * m // 3] for k in range(3)]

    def arc_cost(shift: int) -> float:
        return sum(
            float(np.linalg.norm(np.mean([_MID[e] for e in pa], 0) - np.mean([_MID[e] for e in qa], 0)))
            for pa, qa in zip(p_arcs, q_arcs(shift))
        )

    shift = min(range(m), key=arc_cost)
    ring = []
    for pa, qa in zip(p_arcs, q_arcs(shift)):
        ring.append(12 + len(centers))
        centers.append(sorted(pa + qa))
    # As a boundary of the p-side annulus the ring runs against p; as a boundary of the q-side one, the other way.
    ring_p_side = ring[::-1]
    return _tube(p, ring_p_side, centers) + _tube(q, ring_p_side[::-1], centers)


def _triangulate(topo: CubeTopology) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """Triangles (local vertex ids) and interior-vertex definitions (edge lists) for one cube topology."""
    tris: list[tuple[int, int, int]] = []
    centers: list[list[int]] = []
    in_tube = {i for t in topo.tubes for i in t}
    for i, loop in enumerate(topo.loops):
        if i not in in_tube:
            tris += _disk(loop, centers)
    for i, j in topo.tubes:
        tris += _tube(topo.loops[i], topo.loops[j], centers)
    return tris, centers


@dataclass
class MC33Tables:
    """The generated tables (numpy; the runtime moves them to its device once).

    ``case_of_key``: ``[2**18]`` int32, table key → case id (−1 for keys the runtime never forms).
    ``triangles``: ``[n_cases, T, 3]`` int64 local vertex ids (0–11 edges, 12–13 interior vertices), −1 padded.
    ``centers``: ``[n_cases, MAX_CENTERS, 12]`` bool, the edges averaged into interior vertex 12 + s.
    ``n_triangles``, ``n_centers``: ``[n_cases]`` int64. ``ambiguous_faces``: ``[256]`` int64 mask of the faces each
    config tests. ``needs_interior``: ``[256]`` bool, configs whose triangulation can depend on the interior bits.
    ``unsupported_keys``: keys whose interior bits no disks-and-tubes surface realises (never formed by real data;
    they fall back to one disk per loop, which is still watertight).
    """

    case_of_key: np.ndarray
    triangles: np.ndarray
    n_triangles: np.ndarray
    centers: np.ndarray
    n_centers: np.ndarray
    ambiguous_faces: np.ndarray
    needs_interior: np.ndarray
    unsupported_keys: np.ndarray


def make_key(config: int, face_bits: int, interior_bits: int) -> int:
    return config | (face_bits << 8) | (interior_bits << 14)


def _submasks(mask: int) -> list[int]:
    bits = [b for b in range(8) if (mask >> b) & 1]
    return [sum(1 << b for b, on in zip(bits, sel) if on) for sel in itertools.product((0, 1), repeat=len(bits))]


@lru_cache(maxsize=1)
def generate_tables() -> MC33Tables:
    """Generate the MC33 tables for every key the runtime can form (cached for the process; ~1 s)."""
    case_of_key = np.full(N_KEYS, -1, dtype=np.int32)
    ambiguous = np.zeros(256, dtype=np.int64)
    needs_interior = np.zeros(256, dtype=bool)
    case_ids: dict[tuple, int] = {}
    cases: list[tuple[list, list]] = []
    unsupported = []
    for config in range(256):
        amb = sum(1 << f for f in range(6) if face_ambiguous(config, f))
        ambiguous[config] = amb
        if config in (0, 255):
            case_of_key[make_key(config, 0, 0)] = -1
            continue
        for fb in _submasks(amb):
            for ib in _submasks(interior_bits_possible(config)):
                topo = cube_topology(config, fb, ib)
                if not topo.supported:
                    unsupported.append(make_key(config, fb, ib))
                sig = (tuple(tuple(lp) for lp in topo.loops), tuple(topo.tubes))
                if sig not in case_ids:
                    case_ids[sig] = len(cases)
                    cases.append(_triangulate(topo))
                case_of_key[make_key(config, fb, ib)] = case_ids[sig]
                if case_of_key[make_key(config, fb, ib)] != case_of_key[make_key(config, fb, 0)]:
                    needs_interior[config] = True
    n_tris = max(len(t) for t, _ in cases)
    triangles = np.full((len(cases), n_tris, 3), -1, dtype=np.int64)
    centers = np.zeros((len(cases), MAX_CENTERS, 12), dtype=bool)
    n_centers = np.zeros(len(cases), dtype=np.int64)
    n_triangles = np.array([len(t) for t, _ in cases], dtype=np.int64)
    for i, (tris, cents) in enumerate(cases):
        if len(cents) > MAX_CENTERS:
            raise AssertionError(f"case {i}: {len(cents)} interior vertices > {MAX_CENTERS}")
        triangles[i, : len(tris)] = tris
        n_centers[i] = len(cents)
        for s, edges in enumerate(cents):
            centers[i, s, edges] = True
    return MC33Tables(
        case_of_key,
        triangles,
        n_triangles,
        centers,
        n_centers,
        ambiguous,
        needs_interior,
        np.array(unsupported, dtype=np.int64),
    )
