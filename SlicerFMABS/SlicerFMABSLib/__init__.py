"""Logic of the SlicerFMABS module, importable without Qt (tested headless with slicer-core).

Submodules: ``deps`` (stdlib only: dependency checks), ``jobs`` (stdlib only: background
processes and run files), ``geometry`` and ``segmentations`` (MRML nodes <-> canonical arrays and
files), ``logic`` (the facade the Widget calls). Import submodules explicitly: ``deps`` and
``jobs`` must stay importable before numpy/nibabel are installed.
"""
