"""``clipcli serve``: a warm model behind a JSON API and a search page.

:mod:`.service` answers questions with the commands' own library functions; :mod:`.batcher`
runs the model on one thread, batching requests that arrive together; :mod:`.files` names
indexed files by id and makes thumbnails; :mod:`.guard` checks tokens, hosts and sizes;
:mod:`.app` is the HTTP face (Starlette). Needs the ``serve`` extra.
"""
