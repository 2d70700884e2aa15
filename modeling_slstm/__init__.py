"""sLSTM (xLSTM, Beck et al. 2024) for Hugging Face transformers.

Importing this package registers the model with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_slstm import SLSTMCache, SLSTMCacheLayer
from .configuration_slstm import SLSTMConfig
from .modeling_slstm import SLSTMForCausalLM, SLSTMModel, SLSTMPreTrainedModel
from .rnn_slstm import sLSTM
from .slstm_op import slstm_scan
from .slstm_reference import slstm_scan_reference


AutoConfig.register(SLSTMConfig.model_type, SLSTMConfig, exist_ok=True)
AutoModel.register(SLSTMConfig, SLSTMModel, exist_ok=True)
AutoModelForCausalLM.register(SLSTMConfig, SLSTMForCausalLM, exist_ok=True)
# save_pretrained writes auto_map and copies the code, so trust_remote_code=True loads a folder without this package.
SLSTMConfig.register_for_auto_class()
SLSTMModel.register_for_auto_class("AutoModel")
SLSTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "SLSTMConfig",
    "SLSTMModel",
    "SLSTMForCausalLM",
    "SLSTMPreTrainedModel",
    "SLSTMCache",
    "SLSTMCacheLayer",
    "sLSTM",
    "slstm_scan",
    "slstm_scan_reference",
]
