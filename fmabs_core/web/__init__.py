"""``fmabs web``: the SlicerFMABS panels in a browser (trame-slicer), served from the machine with the GPU.

A front-end like :mod:`fmabs_core.cli`: library modules never import it. It needs the ``web`` extra
(``pip install -e ".[web]"``: trame-slicer, slicer-core) and drives the Slicer module's own logic
(``SlicerFMABSLib``) on trame-slicer's MRML scene, so both front-ends share one copy of the panel logic.

- :mod:`.security`: loopback by default, the access token, paths confined to the project, uploads.
- :mod:`.session`: what each panel does (calls into ``SlicerFMABSLib.logic.FMABSLogic``).
- :mod:`.ui`: the page (five panels over three slice views and a 3D view).
- :mod:`.app`: the trame server, its HTTP routes (upload, download) and the polling loop.
"""
