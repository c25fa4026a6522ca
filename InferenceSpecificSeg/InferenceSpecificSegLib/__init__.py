"""The 3D Slicer side of InferenceSpecificSeg, without Qt.

GUI-free and MRML-free (plain Python, importable anywhere): `i18n`, `settings`, `protocol`, `worker`,
`models`, `dependencies`. Scene side (needs `slicer` MRML classes and vtk, never Qt or torch):
`segmentation`, `logic`. The module file InferenceSpecificSeg.py wires these to the panel.
"""
