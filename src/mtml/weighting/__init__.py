"""Task weightings behind one registry: ``WEIGHTINGS.create(name, task_names, **options)``.

Gradient-based methods (``needs_gramian``) receive the Gramian of per-task gradients and return weights whose
combination ``Σ wᵢ·gᵢ`` is the method's update, so the step backpropagates ``Σ wᵢ·Lᵢ`` once. Methods that are
no such combination (``needs_jacobian``: GradDrop, MoCo, ExcessMTL, trimmed mean) receive the per-task gradient
matrix ``J [m, d]`` and return the shared parameters' update (:class:`JacobianWeighting`).
"""

from mtml.registry import Registry
from mtml.weighting._aligned_mtl import AlignedMTL
from mtml.weighting._auto_lambda import AutoLambda
from mtml.weighting._base import (
    GRAMIAN_BACKENDS,
    JACOBIAN_BACKENDS,
    BilevelWeighting,
    GramianWeighting,
    JacobianUpdate,
    JacobianWeighting,
    Weighting,
)
from mtml.weighting._cagrad import CAGrad
from mtml.weighting._config_grad import ConFIG
from mtml.weighting._db_mtl import DBMTL
from mtml.weighting._dualproj import DualProj
from mtml.weighting._dwa import DWA
from mtml.weighting._equal import Equal
from mtml.weighting._excess_mtl import ExcessMTL
from mtml.weighting._fairgrad import FairGrad
from mtml.weighting._famo import FAMO
from mtml.weighting._fixed import Fixed
from mtml.weighting._gls import GLS
from mtml.weighting._graddrop import GradDrop
from mtml.weighting._gradnorm import GradNorm
from mtml.weighting._gradvac import GradVac
from mtml.weighting._gramian import GramianTape, task_gramian, task_jacobian
from mtml.weighting._imtl import IMTLG, IMTLL
from mtml.weighting._krum import Krum
from mtml.weighting._mgda import MGDA, MGDAUB
from mtml.weighting._moco import MoCo
from mtml.weighting._modo import MoDo
from mtml.weighting._nash_mtl import NashMTL
from mtml.weighting._pcgrad import PCGrad
from mtml.weighting._rlw import RLW
from mtml.weighting._sdmgrad import SDMGrad
from mtml.weighting._si import SI
from mtml.weighting._stch import STCH
from mtml.weighting._trimmed_mean import TrimmedMean
from mtml.weighting._uncertainty import Uncertainty
from mtml.weighting._upgrad import UPGrad

WEIGHTINGS: Registry[Weighting] = Registry("weighting")
WEIGHTINGS.register("equal", Equal, help="w_i = 1: plain sum of task losses")
WEIGHTINGS.register("fixed", Fixed, help="constant user-given weights per task")
WEIGHTINGS.register("uncertainty", Uncertainty, help="learned homoscedastic uncertainty (Kendall et al. 2018)")
WEIGHTINGS.register("dwa", DWA, help="Dynamic Weight Average of loss ratios (Liu et al. 2019)")
WEIGHTINGS.register("rlw", RLW, help="random loss weights drawn every step (Lin et al. 2022)")
WEIGHTINGS.register("gradnorm", GradNorm, help="weights learned to equalise weighted gradient norms (Chen et al. 2018)")
WEIGHTINGS.register("mgda", MGDA, help="min-norm point of the task gradients' convex hull (Désidéri 2012; Sener "
                    "& Koltun 2018)")
WEIGHTINGS.register("mgda_ub", MGDAUB, help="MGDA on representation gradients, the cheap upper bound (Sener & "
                    "Koltun 2018)")
WEIGHTINGS.register("pcgrad", PCGrad, help="project away conflicting gradient components (Yu et al. 2020)")
WEIGHTINGS.register("gradvac", GradVac, help="steer pairwise gradient cosines to EMA targets (Wang et al. 2021)")
WEIGHTINGS.register("cagrad", CAGrad, help="conflict-averse: best worst-task gain near the mean gradient "
                    "(Liu et al. 2021)")
WEIGHTINGS.register("imtl_g", IMTLG, help="equal projection of the update on every unit gradient (Liu et al. 2021)")
WEIGHTINGS.register("imtl_l", IMTLL, help="learned loss scales exp(s_i), penalty -s_i (Liu et al. 2021)")
WEIGHTINGS.register("nash_mtl", NashMTL, help="Nash bargaining solution alpha*(G alpha) = 1 (Navon et al. 2022)")
WEIGHTINGS.register("aligned_mtl", AlignedMTL, help="gradients aligned to condition number 1 (Senushkin et al. "
                    "2023)")
WEIGHTINGS.register("upgrad", UPGrad, help="sum of projections onto the non-conflicting cone (Quinton & Rey 2024)")
WEIGHTINGS.register("famo", FAMO, help="balanced log-loss decrease with O(1) cost (Liu et al. 2023)")
WEIGHTINGS.register("db_mtl", DBMTL, help="log losses + gradients scaled to the largest norm (Lin et al. 2023)")
WEIGHTINGS.register("config_grad", ConFIG, help="equal projection on every unit gradient, length = sum of "
                    "projections (Liu et al. 2025)")
WEIGHTINGS.register("dualproj", DualProj, help="mean gradient projected onto the non-conflicting cone (Quinton & "
                    "Rey 2024)")
WEIGHTINGS.register("sdmgrad", SDMGrad, help="min-norm weights pulled towards the mean gradient, warm-started "
                    "(Xiao et al. 2023)")
WEIGHTINGS.register("modo", MoDo, help="one projected step of MGDA's weights per step (Chen et al. 2023)")
WEIGHTINGS.register("krum", Krum, help="mean of the gradients closest to their neighbours (Blanchard et al. 2017)")
WEIGHTINGS.register("gls", GLS, help="geometric mean of the losses: w_i = (prod L)^(1/m)/(m L_i) (Chennupati et "
                    "al. 2019)")
WEIGHTINGS.register("si", SI, help="scale-invariant sum of log-losses: w_i = 1/L_i (baseline of Navon et al. 2022)")
WEIGHTINGS.register("stch", STCH, help="smooth Tchebycheff of nadir-normalised log-losses, after a log-loss "
                    "warm-up (Lin et al. 2024)")
WEIGHTINGS.register("fairgrad", FairGrad, help="alpha-fair weights (G w)_i = w_i^(-1/alpha) (Ban & Ji 2024)")
WEIGHTINGS.register("graddrop", GradDrop, help="per-coordinate gradient sign dropout by sign purity (Chen et al. "
                    "2020)")
WEIGHTINGS.register("moco", MoCo, help="tracked gradient estimates + projected min-norm weights (Fernando et al. "
                    "2023)")
WEIGHTINGS.register("excess_mtl", ExcessMTL, help="exponentiated weights from AdaGrad excess-risk estimates (He et "
                    "al. 2024)")
WEIGHTINGS.register("trimmed_mean", TrimmedMean, help="coordinate-wise trimmed mean of task gradients (Yin et al. "
                    "2018)")
WEIGHTINGS.register("auto_lambda", AutoLambda, help="weights learned by a one-step look-ahead on validation "
                    "batches (Liu et al. 2022)")

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "GRAMIAN_BACKENDS",
    "IMTLG",
    "IMTLL",
    "JACOBIAN_BACKENDS",
    "MGDA",
    "MGDAUB",
    "RLW",
    "SI",
    "STCH",
    "WEIGHTINGS",
    "AlignedMTL",
    "AutoLambda",
    "BilevelWeighting",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "Equal",
    "ExcessMTL",
    "FairGrad",
    "Fixed",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GramianTape",
    "GramianWeighting",
    "JacobianUpdate",
    "JacobianWeighting",
    "Krum",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "TrimmedMean",
    "UPGrad",
    "Uncertainty",
    "Weighting",
    "task_gramian",
    "task_jacobian",
]
