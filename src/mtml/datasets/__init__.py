"""Built-in datasets: ``DATASETS.create(name, **options) -> list[Task]`` for multi-task training and
``FAMILIES.create(name, **options) -> EpisodeSource`` (task distributions) for meta-learning.

Every dataset here is offline: it comes from a Python package (``pip install 'mtml[data]'``) or is generated.
"""

from mtml.datasets._faces import lfw_faces
from mtml.datasets._families import EpisodeSource, gaussian_classes, sinusoid
from mtml.datasets._fashion import fashion, fashion_fewshot
from mtml.datasets._folders import image_folder, miniimagenet, omniglot
from mtml.datasets._glyphs import GlyphSet, load_glyphs
from mtml.datasets._glyphs_fewshot import glyphs, pixel_nn_accuracy
from mtml.datasets._gradnorm_toy import gradnorm_scales, gradnorm_synthetic
from mtml.datasets._image_suite import images
from mtml.datasets._meta_dataset import MetaDatasetEpisodes, meta_dataset
from mtml.datasets._movies import movies
from mtml.datasets._multi_fashion import multi_fashion, overlay_pairs
from mtml.datasets._penguins import penguins
from mtml.datasets._schools import schools
from mtml.datasets._shifts import fashion_shift, glyph_shift
from mtml.datasets._synthetic import shared_projection, synthetic_linear
from mtml.datasets._table import table
from mtml.datasets._tables_suite import tables
from mtml.datasets._text import texts
from mtml.datasets._text_table import text_table
from mtml.registry import Registry
from mtml.tasks import Task

DATASETS: Registry[list[Task]] = Registry("dataset")
DATASETS.register("penguins", penguins, help="Palmer penguins: species (3 classes) + body mass (regression)")
DATASETS.register("schools", schools, help="160 schools, one maths-score regression task each (nlme MathAchieve)")
DATASETS.register("movies", movies, help="IMDb films: rating (regression) + 7 genre flags (ggplot2movies)")
DATASETS.register("synthetic", synthetic_linear, help="linear tasks sharing a 100→10 projection (seed setup)")
DATASETS.register("texts", texts, help="fortune topic (8 classes) + food-review sentiment + tweet likes, from one "
                  "MiniLM sentence encoder (cached embeddings)")
DATASETS.register("fashion", fashion, help="Fashion-MNIST: 10 categories + 4 coarse groups on the same 28×28 images "
                  "(Debian dataset-fashion-mnist)")
DATASETS.register("fashion_shift", fashion_shift, help="Fashion-MNIST domain shift for mtml adapt: the "
                  "clean source or a shifted target domain (invert, rotate, blur, noise), one 10-class task")
DATASETS.register("glyph_shift", glyph_shift, help="font-style shift for mtml adapt: the same rendered characters, "
                  "source in one font style (sans), target in another (serif)")
DATASETS.register("images", images, help="image suite: glyph script/character/font style, Fashion-MNIST "
                  "category/group, faces vs non-faces (25×25, own stem); [1, 28, 28] inputs for a conv trunk")
DATASETS.register("multi_fashion", multi_fashion, help="Multi-Fashion (Sener & Koltun 2018; Lin et al. 2019): two "
                  "Fashion-MNIST items on a 36×36 canvas, tasks left and right (10 classes each)")
DATASETS.register("gradnorm_synthetic", gradnorm_synthetic, help="GradNorm toy (Chen et al. 2018): 10 regressions "
                  "σᵢ·tanh((B + εᵢ)x), scales σᵢ from 1 to 100 on the same inputs")
DATASETS.register("tables", tables, help="tabular suite: penguins (species, body mass) + movies (rating, 7 genres) "
                  "(+ option schools); use model.stem_width for per-task stems")
DATASETS.register("table", table, help="your CSV/Parquet file: one task per target column (options: path, targets), "
                  "or per target and value of a column (group_by, ids, min_rows, heldout_groups, subset)")
DATASETS.register("text_table", text_table, help="your CSV/Parquet texts: one task per target column, all on the "
                  "text column's MiniLM embeddings (cached) or tokens (options: path, text, targets)")

FAMILIES: Registry[EpisodeSource] = Registry("task family")
FAMILIES.register("sinusoid", sinusoid, help="sinusoid regression, Finn et al. 2017 (meta-learning)")
FAMILIES.register("gaussian_classes", gaussian_classes, help="N-way K-shot over synthetic Gaussian classes")
FAMILIES.register("glyphs", glyphs, help="offline Omniglot stand-in: letters of ~140 scripts rendered from Noto fonts, "
                  "28×28, alphabet-disjoint splits (rendered once, cached)")
FAMILIES.register("image_folder", image_folder, help="N-way K-shot over your class-per-folder images (option: root)")
FAMILIES.register("omniglot", omniglot, help="Omniglot characters, 28×28 (option: root with images_background/, "
                  "images_evaluation/)")
FAMILIES.register("miniimagenet", miniimagenet, help="mini-ImageNet, 84×84 RGB (option: root with train/val/test.csv, "
                  "images/)")
FAMILIES.register("fashion_fewshot", fashion_fewshot, help="N-way K-shot over the 10 Fashion-MNIST categories "
                  "(test episodes from the official test images)")
FAMILIES.register("meta_dataset", meta_dataset, help="Meta-Dataset sampler (Triantafillou et al. 2020): variable-way, "
                  "variable-shot one-task episodes over glyphs + Fashion-MNIST, per-source meta-test")

__all__ = [
                  "DATASETS",
                  "FAMILIES",
                  "EpisodeSource",
                  "GlyphSet",
                  "MetaDatasetEpisodes",
                  "fashion",
                  "fashion_fewshot",
                  "fashion_shift",
                  "gaussian_classes",
                  "glyph_shift",
                  "glyphs",
                  "gradnorm_scales",
                  "gradnorm_synthetic",
                  "image_folder",
                  "images",
                  "lfw_faces",
                  "load_glyphs",
                  "meta_dataset",
                  "miniimagenet",
                  "movies",
                  "multi_fashion",
                  "omniglot",
                  "overlay_pairs",
                  "penguins",
                  "pixel_nn_accuracy",
                  "schools",
                  "shared_projection",
                  "sinusoid",
                  "synthetic_linear",
                  "table",
                  "tables",
                  "text_table",
                  "texts",
]
