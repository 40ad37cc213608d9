"""name -> optimizer class. Each entry is a torch.optim.Optimizer subclass in its own module."""

from __future__ import annotations

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}

# --- core registry (issue 6) ---------------------------------------------------------------
from llmtrain.optim.adabelief import AdaBelief  # noqa: E402
from llmtrain.optim.adafactor import Adafactor  # noqa: E402
from llmtrain.optim.adagrad import Adagrad  # noqa: E402
from llmtrain.optim.adam import Adam, AdamW  # noqa: E402
from llmtrain.optim.adam_mini import AdamMini  # noqa: E402
from llmtrain.optim.adamw8bit import AdamW8bit  # noqa: E402
from llmtrain.optim.galore import GaLoreAdamW  # noqa: E402
from llmtrain.optim.lamb import Lamb  # noqa: E402
from llmtrain.optim.lars import LARS  # noqa: E402
from llmtrain.optim.lion import Lion  # noqa: E402
from llmtrain.optim.muon import Muon  # noqa: E402
from llmtrain.optim.rmsprop import RMSprop  # noqa: E402
from llmtrain.optim.sam import SAM  # noqa: E402
from llmtrain.optim.schedulefree import ScheduleFreeAdamW  # noqa: E402
from llmtrain.optim.sgd import SGD  # noqa: E402
from llmtrain.optim.shampoo import Shampoo  # noqa: E402
from llmtrain.optim.soap import SOAP  # noqa: E402
from llmtrain.optim.sophia import SophiaG  # noqa: E402

OPTIMIZERS.update({
    "sgd": SGD,
    "adagrad": Adagrad,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
    "adabelief": AdaBelief,
    "adafactor": Adafactor,
    "lion": Lion,
    "lamb": Lamb,
    "lars": LARS,
    "sophia": SophiaG,
    "schedulefree_adamw": ScheduleFreeAdamW,
    "adam_mini": AdamMini,
    "muon": Muon,
    "shampoo": Shampoo,
    "soap": SOAP,
    "galore_adamw": GaLoreAdamW,
    "sam": SAM,
    "adamw8bit": AdamW8bit,
})

# --- completed registry (issue 11) ---------------------------------------------------------
from llmtrain.optim.adam_variants import Adamax, NAdam, RAdam  # noqa: E402
from llmtrain.optim.adan import Adan  # noqa: E402
from llmtrain.optim.apollo import APOLLO, APOLLOMini  # noqa: E402
from llmtrain.optim.came import CAME  # noqa: E402
from llmtrain.optim.kfac import KFAC  # noqa: E402
from llmtrain.optim.lbfgs import LBFGS  # noqa: E402
from llmtrain.optim.lomo import LOMO, AdaLomo  # noqa: E402
from llmtrain.optim.nd_adam import NDAdam  # noqa: E402
from llmtrain.optim.psgd_kron import PSGDKron  # noqa: E402
from llmtrain.optim.signsgd import SignSGD, Signum  # noqa: E402
from llmtrain.optim.sm3 import SM3  # noqa: E402

OPTIMIZERS.update({
    "nadam": NAdam,
    "radam": RAdam,
    "adamax": Adamax,
    "adan": Adan,
    "signsgd": SignSGD,
    "signum": Signum,
    "sm3": SM3,
    "came": CAME,
    "lbfgs": LBFGS,
    "nd_adam": NDAdam,
    "apollo": APOLLO,
    "apollo_mini": APOLLOMini,
    "psgd_kron": PSGDKron,
    "kfac": KFAC,
    "lomo": LOMO,
    "adalomo": AdaLomo,
})
