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
from mtml.meta._boil import boil
from mtml.meta._episode import Episode, EpisodeSampler, episode_losses, task_accuracy
from mtml.meta._functional import batched_forward, embed, parameter_filter, task_gradients
from mtml.meta._maml import MAML, fomaml
from mtml.meta._metasgd import MetaSGD
from mtml.meta._mlp import linear_chain
from mtml.meta._paths import SpeedPaths, current_paths, speed_paths
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
ALGORITHMS.register("protonet", ProtoNet, help="Prototypical Networks (Snell et al. 2017)")
ALGORITHMS.register("ridge", R2D2, help="closed-form ridge-regression head, R2D2 (Bertinetto et al. 2019)")

__all__ = [
    "ALGORITHMS",
    "MAML",
    "R2D2",
    "Episode",
    "EpisodeSampler",
    "MetaAlgorithm",
    "MetaOutput",
    "MetaSGD",
    "ProtoNet",
    "Reptile",
    "SpeedPaths",
    "anil",
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
    "parameter_filter",
    "ridge_solve",
    "speed_paths",
    "task_accuracy",
    "task_gradients",
]
