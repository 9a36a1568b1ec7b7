"""Meta-learning: the MAML family, prototypes and closed-form heads, vectorised over the tasks of an episode.

Every algorithm is built the same way, from the model it meta-learns and keyword-only options::

    algorithm = ALGORITHMS.create("maml", model, inner_lr=0.01, inner_steps=1)
    optimizer = torch.optim.Adam(meta_parameters(algorithm, model), lr=1e-3)
    for _ in range(iterations):
        meta_step(algorithm, model, sampler.sample(generator), optimizer)
    meta_evaluate(algorithm, model, test_sampler, num_tasks=600, generator=generator)
"""

from mtml.meta._anil import anil
from mtml.meta._base import MetaAlgorithm, MetaOutput
from mtml.meta._baselines import FineTunedHead, baseline, baseline_pp, rfs_linear
from mtml.meta._boil import boil
from mtml.meta._episode import Episode, EpisodeSampler, episode_losses, task_accuracy
from mtml.meta._functional import batched_forward, embed, parameter_filter, task_gradients
from mtml.meta._maml import MAML, fomaml
from mtml.meta._maml_pp import MAMLPlusPlus, msl_weights
from mtml.meta._metaoptnet import MetaOptNet, svm_dual
from mtml.meta._metasgd import MetaSGD
from mtml.meta._mlp import linear_chain
from mtml.meta._paths import SpeedPaths, current_paths, speed_paths
from mtml.meta._proto_maml import ProtoMAML, prototype_head
from mtml.meta._protonet import ProtoNet
from mtml.meta._r2d2 import R2D2, ridge_solve
from mtml.meta._reptile import Reptile
from mtml.meta._steps import mean_ci, meta_backward, meta_evaluate, meta_parameters, meta_step
from mtml.registry import Registry

ALGORITHMS: Registry[MetaAlgorithm] = Registry("algorithm")
ALGORITHMS.register("maml", MAML, help="MAML, second order (Finn et al. 2017)")
ALGORITHMS.register("fomaml", fomaml, help="first-order MAML (Finn et al. 2017)")
ALGORITHMS.register("reptile", Reptile, help="Reptile (Nichol et al. 2018)")
ALGORITHMS.register("anil", anil, help="MAML adapting the heads only (Raghu et al. 2020)")
ALGORITHMS.register("boil", boil, help="MAML adapting the trunk only (Oh et al. 2021)")
ALGORITHMS.register("metasgd", MetaSGD, help="MAML with learned per-parameter inner rates (Li et al. 2017)")
ALGORITHMS.register("maml_pp", MAMLPlusPlus,
                    help="MAML++: learned per-layer per-step rates, multi-step loss, annealing (Antoniou et al. 2019)")
ALGORITHMS.register("proto_maml", ProtoMAML,
                    help="Proto-MAML: MAML from a prototype-initialised head (Triantafillou et al. 2020)")
ALGORITHMS.register("protonet", ProtoNet, help="Prototypical Networks (Snell et al. 2017)")
ALGORITHMS.register("ridge", R2D2, help="closed-form ridge-regression head, R2D2 (Bertinetto et al. 2019)")
ALGORITHMS.register("metaoptnet", MetaOptNet,
                    help="differentiable multi-class SVM head, MetaOptNet-SVM (Lee et al. 2019)")
ALGORITHMS.register("baseline", baseline, help="linear head fine-tuned on frozen support features (Chen et al. 2019)")
ALGORITHMS.register("baseline_pp", baseline_pp,
                    help="cosine head with learned scale fine-tuned on frozen support features (Chen et al. 2019)")
ALGORITHMS.register("rfs_linear", rfs_linear,
                    help="logistic regression on L2-normalised frozen support features, RFS (Tian et al. 2020)")

__all__ = [
    "ALGORITHMS",
    "MAML",
    "R2D2",
    "Episode",
    "EpisodeSampler",
    "FineTunedHead",
    "MAMLPlusPlus",
    "MetaAlgorithm",
    "MetaOptNet",
    "MetaOutput",
    "MetaSGD",
    "ProtoMAML",
    "ProtoNet",
    "Reptile",
    "SpeedPaths",
    "anil",
    "baseline",
    "baseline_pp",
    "batched_forward",
    "boil",
    "current_paths",
    "embed",
    "episode_losses",
    "fomaml",
    "linear_chain",
    "mean_ci",
    "meta_backward",
    "meta_evaluate",
    "meta_parameters",
    "meta_step",
    "msl_weights",
    "parameter_filter",
    "prototype_head",
    "rfs_linear",
    "ridge_solve",
    "speed_paths",
    "svm_dual",
    "task_accuracy",
    "task_gradients",
]
