"""`--mode=serve`: Starlette routes over a `Searcher`, run by uvicorn.

  GET  /                     the search page (static/index.html)
  GET  /healthz              200 {"images", "dim", "backend", "waiting"} once the index is
                             loaded (waiting: queries queued for the worker)
  POST /search?k=K           body: an image file's bytes -> {"results": [{"rank", "image",
                             "score", "index", "name", "url"}]} (--mode=search's
                             results.json entries, plus the name under the collection root
                             and its /images/ address, null for a symlink out of the root)
  GET  /collection?offset=&limit=   {"total", "images": [{"name", "url"}]} for the page
  GET  /images/<name>        a described image, <name> relative to the collection root

A refused request gets a 4xx and {"error": message}; the server keeps serving. The server
binds `serve.host` (127.0.0.1 unless told otherwise) and `serve.port`; the network and the
index are loaded before it accepts a connection.
"""
import asyncio
import os
from typing import Any, Dict

from absl import logging
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
import uvicorn

from retrieval_jax import descriptor_store
from retrieval_jax.modes import common as modes_common
from retrieval_jax.modes import search as search_mode
from retrieval_jax.search_page import queries

_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
_LISTING_LIMIT = 500  # most collection entries one /collection call returns


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def _int_param(request: Request, name: str, default: int, low: int) -> int:
  raw = request.query_params.get(name)
  if raw is None or raw == "":
    return default
  try:
    value = int(raw)
  except ValueError:
    value = low - 1
  if value < low:
    raise queries.BadQuery(400, f"?{name}={raw!r} must be an integer >= {low}")
  return value


async def _read_body(request: Request, max_bytes: int) -> bytes:
  """The request body, refused (413) as soon as it passes `max_bytes`, unread beyond."""
  declared = request.headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > max_bytes:
    raise queries.BadQuery(413, f"the upload is {declared} bytes, over "
                                f"serve.max_bytes={max_bytes}")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > max_bytes:
      raise queries.BadQuery(413, f"the upload is over serve.max_bytes={max_bytes} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


def make_app(batcher: queries.QueryBatcher, *, max_bytes: int, default_k: int) -> Starlette:
  """The routes of the module docstring over `batcher.searcher`."""
  searcher = batcher.searcher
  collection = searcher.collection
  with open(_PAGE, encoding="utf-8") as f:
    page = f.read()

  async def index(request: Request) -> Response:
    del request
    return HTMLResponse(page)

  async def healthz(request: Request) -> Response:
    del request
    return JSONResponse({"images": len(collection), "dim": searcher.dim,
                         "backend": searcher.backend, "waiting": batcher.waiting})

  async def search(request: Request) -> Response:
    try:
      k = _int_param(request, "k", default_k, 1)
      body = await _read_body(request, max_bytes)
      queries.check_upload(body, max_bytes)
      results = await asyncio.wrap_future(batcher.submit(body, k))
    except queries.BadQuery as e:
      return _error(e.status, e.message)
    return JSONResponse({"results": results})

  async def listing(request: Request) -> Response:
    try:
      offset = _int_param(request, "offset", 0, 0)
      limit = min(_int_param(request, "limit", 100, 1), _LISTING_LIMIT)
    except queries.BadQuery as e:
      return _error(e.status, e.message)
    rows = range(offset, min(offset + limit, len(collection)))
    return JSONResponse({"total": len(collection), "offset": offset,
                         "images": [{"name": collection.names[i], "url": collection.url(i)}
                                    for i in rows]})

  async def image(request: Request) -> Response:
    path = collection.file(request.path_params["name"])
    if path is None:
      return _error(404, "not an image of the described collection")
    return FileResponse(path)

  app = Starlette(routes=[
      Route("/", index),
      Route("/healthz", healthz),
      Route("/search", search, methods=["POST"]),
      Route("/collection", listing),
      Route("/images/{name:path}", image),
  ])
  app.state.batcher = batcher
  return app


def index_folder(config, workdir: str) -> str:
  """The index to serve: `search.index`, else `describe.out`, else <workdir>/describe."""
  return os.path.abspath(config.search.index or config.describe.out
                         or os.path.join(workdir, "describe"))


def make_server(config, workdir: str) -> uvicorn.Server:
  """Loads the network and the index once; the uvicorn server of `config.serve`."""
  folder = index_folder(config, workdir)
  if not os.path.exists(os.path.join(folder, descriptor_store.CONFIG_FILE)):
    raise FileNotFoundError(
        f"--mode=serve: {folder} holds no described collection; run --mode=describe "
        "--config.describe.images=<folder of photos> first (or point search.index / "
        "describe.out at one)")
  stored = descriptor_store.load_descriptors(folder)
  net, mesh = modes_common.network(config, workdir)
  searcher = queries.Searcher(
      net.model, net.variables, mesh, search_mode.query_settings(config, net, stored).extract_kwargs(), stored,
      folder, backend=config.search.backend, factory=config.search.faiss_factory,
      nprobe=int(config.search.nprobe), max_batch=int(config.extract.batch_size))
  searcher.warm_up(int(config.search.k))
  batcher = queries.QueryBatcher(searcher)
  app = make_app(batcher, max_bytes=int(config.serve.max_bytes),
                 default_k=int(config.search.k))
  host = config.serve.host
  if host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("serve: listening on %s, reachable from other machines; the page has no "
                    "login", host)
  logging.info("serve: %d images of %s (%s search); open http://%s:%d/", len(searcher),
               searcher.collection.root, searcher.backend, host, config.serve.port)
  return uvicorn.Server(uvicorn.Config(app, host=host, port=int(config.serve.port),
                                       log_level="info"))


def serve_mode(config, workdir: str) -> Dict[str, Any]:
  """Serves until interrupted (Ctrl-C); returns what was served."""
  server = make_server(config, workdir)
  server.run()
  return {"served": index_folder(config, workdir), "host": config.serve.host,
          "port": int(config.serve.port)}
