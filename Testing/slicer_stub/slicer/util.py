"""Stand-in for ``slicer.util`` (Base/Python/slicer/util.py): the functions the module and its tests call.

Volume files are written and read with SimpleITK. Slicer's nodes are in RAS, ITK files in LPS: as
Slicer's ITK-based I/O does, the writer negates the first two rows of IJK-to-RAS and the reader
negates them back, so ``exportNode`` then ``loadLabelVolume`` is an exact round trip and the file
holds what Slicer itself would write.
"""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import SimpleITK as sitk

import vtk

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _writeImage(array, ijkToRAS, filename, metadata=None):
    ijkToLPS = _LPS_FROM_RAS @ ijkToRAS
    axes = ijkToLPS[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in ijkToLPS[:3, 3]])
    image.SetDirection([float(v) for v in (axes / spacing).ravel()])
    for key, value in (metadata or {}).items():   # NRRD "key:=value" lines
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(filename), True)


def _readImage(filename):
    image = sitk.ReadImage(str(filename))
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    ijkToLPS = np.eye(4)
    ijkToLPS[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    ijkToLPS[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image), _LPS_FROM_RAS @ ijkToLPS


def _addVolumeNode(array, ijkToRAS, name, nodeClassName):
    import slicer
    node = slicer.mrmlScene.AddNewNodeByClass(nodeClassName, name or "")
    node._array = None if array is None else np.array(array)
    node._ijkToRAS = np.array(ijkToRAS, dtype=float)
    return node


# ----------------------------------------------------------------------------- MRML-numpy

def arrayFromVTKMatrix(vmatrix):
    """A vtkMatrix4x4's elements as a numpy array, a copy (util.py ``arrayFromVTKMatrix``)."""
    return np.array(vmatrix._m, dtype=float)


def arrayFromVolume(volumeNode):
    """Voxels as a ``(K, J, I)`` numpy array, not copied (util.py ``arrayFromVolume``). Without image
    data Slicer fails on ``None.GetDimensions()``: an AttributeError."""
    if volumeNode._array is None:
        raise AttributeError("'NoneType' object has no attribute 'GetDimensions'")
    return volumeNode._array


def updateVolumeFromArray(volumeNode, narray):
    """Set the voxels from a ``(K, J, I)`` array, deep-copied (util.py ``updateVolumeFromArray``).
    Slicer refuses arrays that are neither 3-D (scalar) nor 4-D (vector), and 64-bit integers
    (VTK's "long long" volumes do not render)."""
    if narray.ndim not in (3, 4):
        raise RuntimeError("Unsupported numpy array shape: " + str(narray.shape))
    if narray.dtype == np.int64:
        raise RuntimeError("Unsupported numpy array type: long long")
    volumeNode._array = np.array(narray)


def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
    """New volume node from an array; ``ijkToRAS`` a 4x4 array or vtkMatrix4x4 (util.py ``addVolumeFromArray``)."""
    if ijkToRAS is None:
        matrix = np.eye(4)
    elif isinstance(ijkToRAS, vtk.vtkMatrix4x4):
        matrix = ijkToRAS._m.copy()
    else:
        matrix = np.asarray(ijkToRAS, dtype=float)
    node = _addVolumeNode(None, matrix, name, nodeClassName or "vtkMRMLScalarVolumeNode")
    updateVolumeFromArray(node, narray)      # as Slicer does: its refusals apply here too
    return node


class MRMLNodeNotFoundException(Exception):
    """util.py: raised by ``getNode`` when no node matches."""


def getNodes(pattern="*", scene=None, useLists=False):
    """Nodes whose name or ID matches the fnmatch ``pattern``, by name: of nodes sharing a name the last
    one, or all of them in a list with ``useLists`` (util.py ``getNodes``)."""
    import collections
    import fnmatch

    import slicer
    nodes = collections.OrderedDict()
    if scene is None:
        scene = slicer.mrmlScene
    for idx in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(idx)
        if fnmatch.fnmatchcase(node.GetName(), pattern) or fnmatch.fnmatchcase(node.GetID(), pattern):
            if useLists:
                nodes.setdefault(node.GetName(), []).append(node)
            else:
                nodes[node.GetName()] = node
    return nodes


def getNode(pattern="*", index=0, scene=None):
    """The ``index``-th of ``getNodes(pattern)``; MRMLNodeNotFoundException if none (util.py ``getNode``).
    Slicer's Python console has it as plain ``getNode`` (slicerqt.py: ``from slicer.util import *``)."""
    nodes = getNodes(pattern, scene)
    if not nodes:
        raise MRMLNodeNotFoundException("could not find nodes in the scene by name or id '%s'"
                                        % (pattern if isinstance(pattern, str) else ""))
    return list(nodes.values())[index]


def getNodesByClass(className, scene=None):
    """All nodes of ``slicer.mrmlScene`` that are of ``className`` or a subclass, as a list (util.py
    ``getNodesByClass``: it reads ``slicer.mrmlScene`` whatever ``scene`` is)."""
    import slicer
    return [node for node in slicer.mrmlScene._nodes if node.IsA(className)]


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
    """A segment's mask in the reference volume's geometry, exported through a temporary labelmap, as
    slicer.util did before it also removed the colour table the export adds (current util.py removes
    it in its ``finally``; the module copes with both)."""
    import slicer
    if not referenceVolumeNode:
        referenceVolumeNode = segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if not referenceVolumeNode:
            raise RuntimeError("No reference volume is found in the input segmentationNode, therefore a valid "
                               "referenceVolumeNode input is required.")
    segmentIds = vtk.vtkStringArray()
    segmentIds.InsertNextValue(segmentId)
    labelmapVolumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__temp__")
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapVolumeNode, referenceVolumeNode):
            raise RuntimeError("Export of segment failed.")
        narray = arrayFromVolume(labelmapVolumeNode)
    finally:
        slicer.mrmlScene.RemoveNode(labelmapVolumeNode)
    return narray


# ----------------------------------------------------------------------------- IO

_VOLUME_WRITER_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def exportNode(node, filename, properties={}, world=False):
    """Write a volume node to a file without touching its storage node (util.py ``exportNode``).
    A file name no writer knows raises ValueError; a failed write is logged and returns False."""
    if world and node.GetTransformNodeID():
        raise NotImplementedError("stand-in has no transforms")
    if "fileFormat" not in properties:
        extension = next((e for e in _VOLUME_WRITER_EXTENSIONS if str(filename).lower().endswith(e)), None)
        if extension is None:
            raise ValueError(f"Failed to export {node.GetID()} - no known file format was found for filename "
                             f"{filename}")
        properties["fileFormat"] = f"Volume ({extension})"
    if node._array is None:                          # Slicer's writer fails: logged, False
        logging.error("Failed to export node to file: %s", filename)
        return False
    try:
        _writeImage(arrayFromVolume(node), node._ijkToRAS, filename)
    except RuntimeError as exc:   # SimpleITK's I/O errors
        logging.error("Failed to export node to %s: %s", filename, exc)
        return False
    return True


_SEGMENTATION_WRITER_EXTENSIONS = (".seg.nrrd", ".nrrd")   # what the stand-in writes of Slicer's write types


def _writeSegmentation(segmentationNode, filename):
    """vtkMRMLSegmentationStorageNode::WriteBinaryLabelmapRepresentation, for what the stand-in holds: on the
    reference geometry's grid (Slicer's default, CropToMinimumExtent off), non-overlapping segments in one
    layer, each with its ``Segment<N>_ID``, ``_Name``, ``_NameAutoGenerated``, ``_ColorAutoGenerated``,
    ``_Tags``, ``_LabelValue`` and ``_Layer`` keys. Slicer keeps each segment's label value from how it was
    made; the stand-in numbers them by position (N + 1). Other keys Slicer writes (colour, extents,
    conversion parameters) are left out."""
    import slicer
    if segmentationNode._referenceGeometry is None:
        raise NotImplementedError("stand-in writes a segmentation only on its reference geometry")
    ijkToRAS, shape = segmentationNode._referenceGeometry
    labels = np.zeros(shape, dtype=np.uint8)
    keys = {}
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        if segment._mask is not None:
            if (segment._mask.shape != shape
                    or not np.all(np.abs(segment._ijkToRAS - ijkToRAS) < slicer._GEOMETRY_TOLERANCE)):
                raise NotImplementedError("stand-in does not resample: segment geometry differs from the reference")
            if np.any(labels[segment._mask > 0]):
                raise NotImplementedError("stand-in writes one layer: the segments overlap")
            labels[segment._mask > 0] = index + 1
        prefix = f"Segment{index}_"
        keys.update({prefix + "ID": segmentId, prefix + "Name": segment.GetName(),
                     prefix + "NameAutoGenerated": "1" if segment.GetNameAutoGenerated() else "0",
                     prefix + "ColorAutoGenerated": "1" if segment.GetColorAutoGenerated() else "0",
                     prefix + "Tags": "".join(f"{k}:{v}|" for k, v in sorted(segment._tags.items())),
                     prefix + "LabelValue": str(index + 1), prefix + "Layer": "0"})
    _writeImage(labels, ijkToRAS, filename, keys)


def saveNode(node, filename, properties={}):
    """Save a node to ``filename`` with the writer of its type; True on success (util.py ``saveNode``, through
    ``app.coreIOManager().saveNodes``). Slicer also points the node's storage node at the file; the stand-in
    has no storage nodes. It writes segmentations as ``.seg.nrrd`` / ``.nrrd`` only (see
    ``_writeSegmentation``); anything else is beyond it, not a refusal Slicer makes."""
    properties["nodeID"] = node.GetID()
    properties["fileName"] = filename
    if not node.IsA("vtkMRMLSegmentationNode"):
        raise NotImplementedError(f"stand-in saves only segmentations, not {node.GetClassName()}")
    if not str(filename).lower().endswith(_SEGMENTATION_WRITER_EXTENSIONS):
        raise NotImplementedError(f"stand-in writes segmentations as {' or '.join(_SEGMENTATION_WRITER_EXTENSIONS)}")
    _writeSegmentation(node, filename)
    return True


def _loadVolumeFile(filename, properties, nodeClassName):
    if not os.path.isfile(filename):
        raise RuntimeError("Failed to load node from file: " + str(filename))
    import slicer
    array, ijkToRAS = _readImage(filename)
    name = properties.get("name") or os.path.basename(str(filename)).split(".")[0]
    # vtkSlicerVolumesLogic::AddArchetypeVolume names the node GetUniqueNameByString(name), the name
    # given included: a file loaded twice, or a name already taken, gets "_1"
    return _addVolumeNode(array, ijkToRAS, slicer.mrmlScene.GenerateUniqueName(name), nodeClassName)


def loadVolume(filename, properties={}, returnNode=False):
    """Load a scalar volume; properties ``name``, ``show`` (util.py ``loadVolume``)."""
    return _loadVolumeFile(filename, properties, "vtkMRMLScalarVolumeNode")


def loadLabelVolume(filename, properties={}, returnNode=False):
    """Load a labelmap volume (util.py ``loadLabelVolume``, which sets ``properties["labelmap"]``)."""
    properties["labelmap"] = True
    return _loadVolumeFile(filename, properties, "vtkMRMLLabelMapVolumeNode")


# ----------------------------------------------------------------------------- dialogs, packages

def _testingEnabled():
    import slicer
    return slicer.app.testingEnabled()


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    """Ask OK/Cancel (util.py): in testing mode Slicer skips the popup and answers OK. Otherwise the
    stand-in, with no user to click, answers Cancel; tests replace it to answer OK."""
    logging.info("confirmOkCancelDisplay: %s", text)
    return _testingEnabled()


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    """Log at error level and show a popup (util.py); the stand-in only logs."""
    logging.error(text)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    """Show the error, with the traceback as detailed text, and re-raise (util.py ``tryWithErrorDisplay``);
    in testing mode Slicer shows nothing."""
    try:
        yield
    except Exception as exc:
        if show and not _testingEnabled():
            import traceback
            errorDisplay(f"{message}\n\n{exc}" if message else str(exc), detailedText=traceback.format_exc())
        raise


def pip_install(requirements, **kwargs):
    """Install Python packages: current Slicer's util.py delegates to slicer.packaging.pip_install."""
    from slicer.packaging import pip_install as _pip_install
    return _pip_install(requirements, **kwargs)


class VTKObservationMixin:
    """util.py ``VTKObservationMixin``: the widget's observer bookkeeping. As Slicer's, it observes through
    ``obj.AddObserver(event, method, priority)``, once per (obj, event, method), and removes with
    ``obj.RemoveObserver(tag)``. Slicer's keeps ``Observations`` as (obj, event, method, group, tag,
    priority); the module never reads it, so the stand-in keeps its own private list rather than a look-alike."""

    def __init__(self):
        self._observed = []   # (obj, event, method, tag)

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        if any(o[:3] == (obj, event, method) for o in self._observed):
            return   # Slicer warns "already has observer" and adds none
        self._observed.append((obj, event, method, obj.AddObserver(event, method, priority)))

    def removeObserver(self, obj, event, method):
        for observation in [o for o in self._observed if o[:3] == (obj, event, method)]:
            obj.RemoveObserver(observation[3])
            self._observed.remove(observation)

    def removeObservers(self, method=None):
        for observation in [o for o in self._observed if method is None or o[2] == method]:
            observation[0].RemoveObserver(observation[3])
            self._observed.remove(observation)
