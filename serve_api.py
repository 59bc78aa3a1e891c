"""Stage 8 - serve the model over HTTP: /summarize, OpenAI-compatible /v1 endpoints, a page at /.

Reads:  MODEL (clean merged folder from post_merge_cleanup.py, a merged or adapter folder, a
        CTranslate2 export, or a Hub id)
        $FTF_API_TOKEN (optional; when set, every route but /health needs "Authorization: Bearer <token>")
Writes: nothing (one JSON access-log line per request on stderr; uvicorn logs at LOG_LEVEL)

Run as:
    python serve_api.py --model=ft_outputs/bart_merged_clean      # http://127.0.0.1:8000/ (page), /docs
    curl -s localhost:8000/summarize -H 'content-type: application/json' \
         -d '{"dialogue": "Anna: Lunch?\nTom: Sure.", "generation": {"max_new_tokens": 40}}'
    curl -N 'localhost:8000/summarize?stream=true' -d '{"dialogue": "Anna: Lunch?\nTom: Sure."}'
    OpenAI clients: base_url=http://127.0.0.1:8000/v1, model = the id GET /v1/models lists.
The dialogue is wrapped in the instruction and prompt the model was trained and evaluated with,
and decoded with its evaluated settings unless a request overrides them within the limits.
Concurrent requests are micro-batched and take turns per client (address + X-Client-Id or the
OpenAI "user"), so one heavy client cannot starve the others; a request is refused up front when
its estimated work (input tokens + beams x new tokens over every window) is over
REQUEST_TOKEN_BUDGET, stopped when it runs past REQUEST_TIMEOUT_S, and cancelled when its client
hangs up. SIGTERM: no new connections, in-flight requests get SHUTDOWN_TIMEOUT_S to finish, then
the rest is cancelled and the process exits. Every error is a 4xx/5xx JSON object.
Decoding: the model's record (or DECODING) is the default; a request may ask for "decoding":
"greedy" | "beam" | "mbr" ("generation" of /summarize, or the OpenAI body's ftf extension field),
mbr only with MBR_REQUESTS=True (or when it is the default).
Streaming: /v1 with "stream": true and /summarize?stream=true send each summary's text as its
tokens are generated, inside the micro-batch (UTF-8 safe; the pieces add up to exactly the
non-streamed text). MBR and beam-search answers are final only when done: one delta.
Checks (CHECKS=True): every summary is checked against its dialogue (unsupported names, numbers,
times; the weakest sentence's support when the MiniLM encoder is installed) and the answer says
what was flagged, where (ftf.checks); the page highlights it. Dialogues longer than the checks
were validated for (meetings) get no flags and say so; a failing check never fails a request.
"""
MODEL = "ft_outputs/bart_merged_clean"  # clean/merged model folder, adapter folder, or Hub id
BASE_MODEL = None                      # [str | None] adapter folders only: the base, when its recorded path is gone
MODEL_ID = None                        # [str | None] the model's name in /v1/models; None: the folder's name
HOST = "127.0.0.1"                     # bind address (loopback; 0.0.0.0 exposes the service: set a token)
PORT = 8000                            # [0 <= int <= 65535] TCP port (0: any free port, printed at start)
BATCH_SIZE = 8                         # [int >= 1] most dialogues (or windows) generated together
BATCH_WAIT_MS = 10.0                   # [0 <= float <= 10000] how long to collect concurrent dialogues (ms)
MICRO_BATCHING = True                  # False: one request at a time (for comparison)
MAX_BODY_BYTES = 1_000_000             # [int >= 1024] request body limit (bytes) -> 413
MAX_DIALOGUES = 16                     # [int >= 1] dialogues per request -> 422
MAX_CHARS = 20_000                     # [int >= 1] characters per dialogue -> 422
MAX_NEW_TOKENS_LIMIT = 256             # [int >= 1] the most new tokens a request may ask for -> 422
MAX_BEAMS = 8                          # [int >= 1] the most beams a request may ask for -> 422
MAX_PENDING = 1024                     # [int >= 1] dialogues waiting before new requests get 503
REQUEST_TOKEN_BUDGET = 100_000         # [int >= 1] work tokens per request (inputs + beams x new tokens) -> 413
REQUEST_TIMEOUT_S = 120.0              # [0 < float <= 86400] wall-clock budget per request -> 504
CLIENT_PENDING_TOKENS = 200_000        # [int >= 1] work tokens one client may have queued or running -> 429
SHUTDOWN_TIMEOUT_S = 30.0              # [0 <= float <= 3600] on SIGTERM, time in-flight requests get to finish
LONG_INPUT = "chunk"                   # [truncate | chunk | error] dialogues over MAX_INPUT_LENGTH tokens
MAX_INPUT_LENGTH = None                # [int >= 16 | None] tokens per model input; None: run_config.json/the model's
INSTRUCTION = None                     # [str | None] causal models' instruction; None: the one it was trained with
NUM_BEAMS = None                       # [int >= 1 | None] default decoding settings; None: inherited (evaluated)
MAX_NEW_TOKENS = None                  # [int >= 1 | None] tokens; None: inherited
MIN_NEW_TOKENS = None                  # [int >= 0 | None] None: inherited
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: inherited
LENGTH_PENALTY = None                  # [float | None] None: inherited
DECODING = None                        # [greedy | beam | mbr | None] the default; None: inherited, else greedy/beam
MBR_REQUESTS = False                   # a request may ask for "decoding": "mbr" (1 + MBR_SAMPLES generations each)
MBR_SAMPLES = None                     # [int >= 1 | None] mbr: samples besides the greedy one; None: inherited, else 8
MBR_TEMPERATURE = None                 # [float > 0 | None] mbr: sampling temperature; None: inherited, else 0.7
MBR_TOP_P = None                       # [0 < float <= 1 | None] mbr: nucleus sampling; None: inherited, else 0.95
MBR_UTILITY = None                     # [rougeL | chrf | minilm | None] mbr: agreement; None: inherited, else rougeL
MBR_FAITHFUL = None                    # [bool | None] mbr: drop unfaithful candidates first; None: inherited, else True
MBR_SEED = None                        # [int >= 0 | None] mbr: seeds the samples; None: inherited, else 42
CHECKS = True                          # run the shipped faithfulness checks on every summary (ftf.checks)
CHECKS_ENCODER = None                  # [str | None] checks' sentence encoder: None = MiniLM when installed, "" = none
TOKEN_ENV = "FTF_API_TOKEN"            # environment variable holding the optional bearer token
DEVICE = None                          # [str | None] None: cuda when available, else cpu
ACCESS_LOG = True                      # one JSON line per request on stderr
LOG_LEVEL = "warning"                  # [critical | error | warning | info | debug | trace] uvicorn's log level

import logging
import socket
import sys

import uvicorn

from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.serve.http_api import create_app
from finetuneflow.serve.inference_io import inherit_defaults, load_for_inference, model_info
from finetuneflow.quality.mbr import check_utility
from finetuneflow.serve.options import ServerOptions

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: any free port), or one error line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--HOST={host} is not an address this machine can listen on ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --PORT") from None
    return sock


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    sock = listen(cfg.HOST, cfg.PORT)      # a taken port fails before the model loads
    loaded = load_for_inference(cfg.MODEL, cfg.BASE_MODEL, cfg.DEVICE)
    inherit_defaults(cfg, loaded)
    options = ServerOptions.from_config(cfg)
    loaded.backend.refuse_unsupported(options.defaults)     # the default decoding must run here
    if options.mbr_allowed():
        check_utility(options.mbr_utility)
    app = create_app(loaded, options)
    if options.access_log:
        handler = logging.StreamHandler(sys.stderr)
        access = logging.getLogger("finetuneflow.access")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    port = sock.getsockname()[1]
    if cfg.HOST not in LOOPBACK and options.token() is None:
        print(f"warning: listening on {cfg.HOST} without a token; set ${cfg.TOKEN_ENV} to require one")
    host = f"[{cfg.HOST}]" if ":" in cfg.HOST else cfg.HOST
    print(f"serving {model_info(loaded)['model']} as {app.state.service.model_id!r} on http://{host}:{port} "
          f"(page: /, docs: /docs, OpenAI: /v1)", flush=True)
    config = uvicorn.Config(app, log_level=cfg.LOG_LEVEL, access_log=False,
                            timeout_graceful_shutdown=options.shutdown_timeout_s)
    uvicorn.Server(config).run(sockets=[sock])
    return {"port": port}


if __name__ == "__main__":
    run_cli(main)
