"""`--mode=serve`: a local web page and JSON API over a collection `--mode=describe` wrote.

  collection.py  the described images and the only files the server hands out;
  queries.py     upload checks, and one worker that describes and searches queries in
                 batches (the network and the index loaded once);
  app.py         the Starlette routes, the uvicorn server, the mode;
  static/        the page (HTML, CSS and JS in one file; nothing from a CDN).
"""
