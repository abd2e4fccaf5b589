"""Trying an edit by hand: a local web page (`lmedit ui`) and a terminal chat (`lmedit chat`) on any model lmedit loads.

session.py holds the model, the stack of applied patches and the one lock every model access takes; jobs.py runs
edits one at a time on a single worker; server.py is the Starlette app (JSON API + the page in static/, served
from the package: nothing is fetched from outside); chat.py is the chat loop; archive.py packs a patch directory
for download and unpacks an upload. Only the editors, patches and scorers of the layers below do the work.
"""
