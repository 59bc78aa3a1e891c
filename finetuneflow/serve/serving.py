"""Moved: the command-line half of the old serving.py is finetuneflow/serve/inference_io.py, the HTTP
half http_api.py and openai_api.py, the micro-batcher batching.py. This module keeps the old
import path for the CLI names (load_for_inference, inherit_defaults, read_inputs, ...)."""
from finetuneflow.serve.inference_io import (INHERITED, INPUT_FORMATS, OUTPUT_FORMATS, Inputs,  # noqa: F401
                                             inherit_defaults, load_for_inference, model_info, read_inputs,
                                             write_outputs)
