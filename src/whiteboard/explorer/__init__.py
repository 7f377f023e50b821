"""The live whiteboard: ``whiteboard serve`` and what it computes.

* :mod:`~whiteboard.explorer.analysis` - predictions, boards, the distance curve and the
  gradient reach of a text, for every served model (plain torch; no web code);
* :mod:`~whiteboard.explorer.corpus` - LSTMVis's select and match over a corpus file, and
  the export of a corpus's states in the layout LSTMVis reads;
* :mod:`~whiteboard.explorer.server` - the web app (FastAPI on uvicorn) and its page.
"""
