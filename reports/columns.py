"""Column definitions shared by the Markdown and HTML leaderboards: each column has a key (used in HTML sort links,
e.g. `#sort=p&desc=1`), a header, and a cell function giving the displayed text and a sort value (float or None)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .formats import FLAGGED_MARK, fmt_eps, fmt_int, fmt_pct, fmt_ratio, fmt_robust, fmt_sig, fmt_width, radii_cell
from .values import num
from .table import Entry, Stat


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    cell: Callable[[Entry], tuple[str, float | None]]
    numeric: bool = True
    title: str = ""


def _pct(attr: str):
    def cell(e: Entry):
        st: Stat = getattr(e, attr)
        return fmt_pct(st.mean, st.ci), st.mean
    return cell


def _sig(attr: str, with_ci: bool = True):
    def cell(e: Entry):
        st: Stat = getattr(e, attr)
        return fmt_sig(st.mean, st.ci if with_ci else None), st.mean
    return cell


def _ratio(attr: str):
    def cell(e: Entry):
        st: Stat = getattr(e, attr)
        return fmt_ratio(st.mean), st.mean
    return cell


def _robust(e: Entry):
    st: Stat = e.robust
    return fmt_robust(st.mean, st.ci, e.verified(e.eps)), st.mean


def _label(e: Entry):
    """The entry's label, marked when its attacks may have been fooled (its flags say which)."""
    return (f"{e.label} {FLAGGED_MARK}" if e.flagged else e.label), None


def _flags(e: Entry):
    return ", ".join(e.flags), None


FAMILY = Column("family", "family", lambda e: (e.family or "?", None), numeric=False)
MODEL = Column("model", "model", _label, numeric=False,
               title="model entry and width (recipe, n, noise when they vary)")
WIDTH = Column("width", "width", lambda e: (fmt_width(e.width), num(e.width)))
SEEDS = Column("seeds", "seeds", lambda e: (str(len(e.rows)), float(len(e.rows))), title="rows (seeds) aggregated")
P = Column("p", "p", lambda e: (fmt_int(e.params.mean), e.params.mean), title="trainable parameters")
RATIO = Column("ratio", "p/(n·d)", _ratio("ratio"))
RATIO_EFF = Column("ratio_eff", "p/(n·d_eff)", _ratio("ratio_eff"), title="d_eff: Levina-Bickel intrinsic dimension")
EPS = Column("eps", "eps", lambda e: (fmt_eps(e.eps), e.eps),
             title="headline eps: largest AutoAttack eps, else largest eps")
CLEAN = Column("clean", "clean %", _pct("clean"))
PGD = Column("pgd", "PGD %", _pct("pgd"))
AA = Column("aa", "AutoAttack %", _pct("aa"))
ROBUST = Column("robust", "robust %", _robust, title="per-point worst case over every attack")
CERT = Column("cert", "certified %", _pct("cert"))
RADII = Column("radius", "radius cert / atk", lambda e: (radii_cell(*e.radii), e.radii[0]),
               title="median certified radius / median attacked radius (the smallest eps that breaks a point)")
LIP_UP = Column("lip_upper", "lip_upper", _sig("lip_upper"), title="certified global L2 upper bound")
LIP_LO = Column("lip_lower", "lip_lower", _sig("lip_lower"), title="empirical lower bound")
LAW = Column("law_scale", "law_scale", _sig("law_scale", with_ci=False), title="sqrt(n·d/p)")
FLAGS = Column("flags", "flags", _flags, numeric=False)

LEADERBOARD = (FAMILY, MODEL, WIDTH, SEEDS, P, RATIO, RATIO_EFF, EPS, CLEAN, PGD, AA, ROBUST, CERT, RADII, LIP_UP,
               LIP_LO, LAW, FLAGS)

RANKING = (
    Column("model", "Model", _label, numeric=False),
    Column("family", "Family", lambda e: (e.family or "?", None), numeric=False),
    P, RATIO, EPS,
    Column("clean", "Clean %", _pct("clean")),
    Column("aa", "AutoAttack %", _pct("aa")),
    Column("robust", "Robust %", _robust, title="ranking key: per-point worst case over every attack"),
    Column("cert", "Certified %", _pct("cert")),
    Column("radius", "Radius cert / atk", RADII.cell, title=RADII.title),
    FLAGS,
)
