"""Stand-in for the ``slicer`` package: the scene, the application, the MRML nodes the module uses.

Everything here mirrors a name in 3D Slicer's source with the same signature; the citing comment
names the header. Nodes hold real data: a volume node keeps its voxels as a numpy array in
``(K, J, I)`` order (as ``slicer.util.arrayFromVolume`` returns them) and a 4x4 IJK-to-RAS matrix;
a segment keeps a binary mask with the geometry it was imported in. Nothing resamples: the stand-in
raises where Slicer would resample, so a geometry mismatch cannot pass unnoticed.
"""
from __future__ import annotations

import logging
import tempfile

import numpy as np

import qt as _qt
import vtk as _vtk


class vtkSegmentationConverter:
    """Libs/vtkSegmentationCore/vtkSegmentationConverter.h: the representation names (static)."""

    @staticmethod
    def GetSegmentationBinaryLabelmapRepresentationName():
        return "Binary labelmap"

    @staticmethod
    def GetSegmentationClosedSurfaceRepresentationName():
        return "Closed surface"


_BINARY_LABELMAP = vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()   # private shorthand, not a Slicer name

# ----------------------------------------------------------------------------- nodes

class vtkMRMLNode:
    """Libs/MRML/Core/vtkMRMLNode.h: ID, name, node references."""

    def __init__(self):
        self._id = None
        self._name = ""
        self._scene = None
        self._references = {}

    def GetClassName(self):
        return type(self).__name__

    def IsA(self, className):
        return any(cls.__name__ == className for cls in type(self).__mro__)

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = str(name)

    def GetScene(self):
        return self._scene

    def SetNodeReferenceID(self, referenceRole, referencedNodeID):
        self._references[referenceRole] = referencedNodeID

    def GetNodeReferenceID(self, referenceRole):
        return self._references.get(referenceRole)

    def GetNodeReference(self, referenceRole):
        nodeID = self._references.get(referenceRole)
        return self._scene.GetNodeByID(nodeID) if (self._scene is not None and nodeID) else None


class vtkMRMLTransformableNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLTransformableNode.h: the parent transform reference."""

    def GetTransformNodeID(self):
        return self.GetNodeReferenceID("transform")

    def SetAndObserveTransformNodeID(self, transformNodeID):
        self.SetNodeReferenceID("transform", transformNodeID)
        return True


class vtkMRMLTransformNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLTransformNode.h: the stand-in keeps the matrix but never applies it (nodes
    under different transforms are refused where Slicer would resample)."""

    def __init__(self):
        super().__init__()
        self._matrixToParent = None

    def SetMatrixTransformToParent(self, matrix):
        """``int SetMatrixTransformToParent(vtkMatrix4x4*)``: 1 when set."""
        self._matrixToParent = matrix
        return 1


class vtkMRMLLinearTransformNode(vtkMRMLTransformNode):
    """Libs/MRML/Core/vtkMRMLLinearTransformNode.h: a parent transform."""


class _ImageData:
    """The part of vtkImageData (Common/DataModel/vtkImageData.h) the module looks at: dimensions
    and components (a vector volume's array is (K, J, I, components), as arrayFromVolume gives it)."""

    def __init__(self, array):
        self._array = array

    def GetDimensions(self):
        return tuple(int(n) for n in reversed(self._array.shape[:3]))

    def GetNumberOfScalarComponents(self):
        return int(self._array.shape[3]) if self._array.ndim == 4 else 1


class vtkMRMLVolumeNode(vtkMRMLTransformableNode):
    """Libs/MRML/Core/vtkMRMLVolumeNode.h: voxels and the IJK-to-RAS matrix."""

    def __init__(self):
        super().__init__()
        self._array = None           # (K, J, I) voxels, or None before image data is set
        self._ijkToRAS = np.eye(4)

    def GetImageData(self):
        return None if self._array is None else _ImageData(self._array)

    def GetIJKToRASMatrix(self, mat):
        mat._m = self._ijkToRAS.copy()

    def CopyOrientation(self, node):
        """Origin, spacing and directions of ``node`` (vtkMRMLVolumeNode.cxx: its IJK-to-RAS)."""
        self._ijkToRAS = node._ijkToRAS.copy()

    def GetSpacing(self):
        return tuple(float(s) for s in np.linalg.norm(self._ijkToRAS[:3, :3], axis=0))

    def GetOrigin(self):
        return tuple(float(v) for v in self._ijkToRAS[:3, 3])

    def CreateDefaultDisplayNodes(self):
        pass


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    """Libs/MRML/Core/vtkMRMLScalarVolumeNode.h"""


class vtkMRMLVectorVolumeNode(vtkMRMLScalarVolumeNode):
    """Libs/MRML/Core/vtkMRMLVectorVolumeNode.h: several components per voxel (e.g. RGB)."""


class vtkMRMLColorTableNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLColorTableNode.h: only what ExportSegmentsToLabelmapNode does with one."""

    def __init__(self):
        super().__init__()
        self._type = None

    def SetTypeToUser(self):
        self._type = "User"


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    """Libs/MRML/Core/vtkMRMLLabelMapVolumeNode.h"""


# vtkOrientedImageDataResample.h AreEqualWithTolerance: geometries closer than this in every element match
_GEOMETRY_TOLERANCE = 1e-4

_DEFAULT_TERMINOLOGY_ENTRY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue"
                              "~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^")


class vtkSegment:
    """Libs/vtkSegmentationCore/vtkSegment.h: name, colour, tags, and (here) one binary mask."""

    def __init__(self):
        self._name = ""
        self._color = (0.5, 0.5, 0.5)
        # vtkSegment.cxx's constructor tags every new segment with Slicer's generic "Tissue" terminology
        self._tags = {"TerminologyEntry": _DEFAULT_TERMINOLOGY_ENTRY}
        self._mask = None          # (K, J, I) uint8, in the geometry below
        self._ijkToRAS = None
        self._nameAutoGenerated = True    # vtkSegment's defaults
        self._colorAutoGenerated = True

    def SetNameAutoGenerated(self, value):
        self._nameAutoGenerated = bool(value)

    def GetNameAutoGenerated(self):
        return self._nameAutoGenerated

    def SetColorAutoGenerated(self, value):
        self._colorAutoGenerated = bool(value)

    def GetColorAutoGenerated(self):
        return self._colorAutoGenerated

    @staticmethod
    def GetTerminologyEntryTagName():
        return "TerminologyEntry"

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = str(name)

    def GetColor(self):
        return tuple(self._color)

    def SetColor(self, *color):
        # vtkSetVector3Macro: SetColor(r, g, b) and SetColor(double[3])
        rgb = color[0] if len(color) == 1 else color
        self._color = tuple(float(c) for c in rgb)

    def SetTag(self, tag, value):
        self._tags[str(tag)] = str(value)

    def GetTag(self, tag, value):
        # bool GetTag(std::string tag, std::string& value): the value comes back in a vtk.reference
        if str(tag) not in self._tags:
            return False
        value.set(self._tags[str(tag)])
        return True


class vtkSegmentation:
    """Libs/vtkSegmentationCore/vtkSegmentation.h: an ordered set of segments by ID."""

    # the header's extent-computation enum, in its order
    EXTENT_REFERENCE_GEOMETRY = 0
    EXTENT_UNION_OF_SEGMENTS = 1
    EXTENT_UNION_OF_SEGMENTS_PADDED = 2
    EXTENT_UNION_OF_EFFECTIVE_SEGMENTS = 3
    EXTENT_UNION_OF_EFFECTIVE_SEGMENTS_PADDED = 4

    def __init__(self):
        self._segments = {}   # ID -> vtkSegment, in insertion order
        self._segmentIdAutogeneratorIndex = 0
        self._sourceRepresentationName = _BINARY_LABELMAP   # Slicer's default for a new segmentation

    def _generateUniqueSegmentID(self, segmentId):
        """vtkSegmentation::GenerateUniqueSegmentID: the ID itself if free, else ``<ID or Segment>_<counter>``."""
        if segmentId and segmentId not in self._segments:
            return segmentId
        prefix = segmentId or "Segment"
        while True:
            self._segmentIdAutogeneratorIndex += 1
            candidate = f"{prefix}_{self._segmentIdAutogeneratorIndex}"
            if candidate not in self._segments:
                return candidate

    def AddEmptySegment(self, segmentId="", segmentName="", color=None):
        segmentId = self._generateUniqueSegmentID(segmentId)
        segment = vtkSegment()
        segment.SetName(segmentName or segmentId)
        if color is not None:
            segment.SetColor(color)
        self._segments[segmentId] = segment
        return segmentId

    def GetSourceRepresentationName(self):
        return self._sourceRepresentationName

    def SetSourceRepresentationName(self, representationName):
        self._sourceRepresentationName = str(representationName)

    def GetSegment(self, segmentId):
        return self._segments.get(segmentId)

    def GetNumberOfSegments(self):
        return len(self._segments)

    def GetNthSegmentID(self, index):
        """Slicer returns "" for an index out of range."""
        ids = list(self._segments)
        return ids[index] if 0 <= index < len(ids) else ""

    def RemoveAllSegments(self):
        """Slicer also restarts the counter that generated IDs are numbered by."""
        self._segments.clear()
        self._segmentIdAutogeneratorIndex = 0

    def CopySegmentFromSegmentation(self, fromSegmentation, segmentId, removeFromSource=False):
        """Slicer: a copy of the segment (moved with ``removeFromSource``) under the same ID, or a
        generated unique one if this segmentation has that ID already; False for no such segment."""
        if fromSegmentation is None or not segmentId:
            return False
        segment = fromSegmentation.GetSegment(segmentId)
        if segment is None:
            return False
        copy = vtkSegment()
        copy.__dict__.update({k: (v.copy() if hasattr(v, "copy") else v) for k, v in segment.__dict__.items()})
        self._segments[self._generateUniqueSegmentID(segmentId)] = copy
        if removeFromSource:
            del fromSegmentation._segments[segmentId]
        return True


class vtkMRMLSegmentationNode(vtkMRMLTransformableNode):
    """Libs/MRML/Core/vtkMRMLSegmentationNode.h"""

    def __init__(self):
        super().__init__()
        self._segmentation = vtkSegmentation()
        self._referenceGeometry = None   # (ijkToRAS 4x4, (K, J, I) shape)

    @staticmethod
    def GetReferenceImageGeometryReferenceRole():
        return "referenceImageGeometryRef"

    def GetSegmentation(self):
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode):
        """Slicer returns without a change when the volume has no voxels, and maps the volume's geometry
        through the transform between the two nodes when their parent transforms differ; the stand-in
        has no transform matrices, so it refuses that case instead of storing an untransformed geometry."""
        if volumeNode is None or volumeNode is self or volumeNode.GetImageData() is None:
            return
        if volumeNode.GetTransformNodeID() != self.GetTransformNodeID():
            raise NotImplementedError("stand-in does not transform: the volume and the segmentation "
                                      "have different parent transforms")
        self._referenceGeometry = (volumeNode._ijkToRAS.copy(), tuple(volumeNode._array.shape))
        self.SetNodeReferenceID(self.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())

    def SetSourceRepresentationToBinaryLabelmap(self):
        """Slicer switches the source representation without converting: the segments' other
        representations are invalidated, so a segmentation holding only closed surfaces loses its
        data. The stand-in only switches an empty segmentation and refuses otherwise."""
        if self._segmentation.GetNumberOfSegments():
            raise NotImplementedError("stand-in converts only an empty segmentation")
        self._segmentation.SetSourceRepresentationName(_BINARY_LABELMAP)
        return True

    def CreateDefaultDisplayNodes(self):
        pass


class vtkMRMLTableNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLTableNode.h: string columns (vtkStringArray), addressed by index."""

    def __init__(self):
        super().__init__()
        self._columnNames = []
        self._columns = []     # vtkStringArray each, as many values as the table has rows

    def RemoveAllColumns(self):
        self._columnNames, self._columns = [], []
        return True

    def AddColumn(self, column=None):
        """Slicer appends ``column`` or, without one, a new vtkStringArray of empty strings as long
        as the table, and returns the array it appended; the stand-in only makes new columns."""
        if column is not None:
            raise NotImplementedError("stand-in only adds new, empty columns")
        column = _vtk.vtkStringArray()
        for _ in range(self.GetNumberOfRows()):
            column.InsertNextValue("")
        self._columnNames.append(f"Column {len(self._columns) + 1}")
        self._columns.append(column)
        return column

    def RenameColumn(self, columnIndex, newName):
        self._columnNames[columnIndex] = str(newName)
        return True

    def AddEmptyRow(self):
        for column in self._columns:
            column.InsertNextValue("")
        return self.GetNumberOfRows() - 1

    def _cellIndexError(self, method, rowIndex, columnIndex):
        """Slicer's check before a cell is read or written: the vtkErrorMacro text for a bad index, or None."""
        if not 0 <= columnIndex < len(self._columns):
            return f"vtkMRMLTableNode::{method} failed: invalid column index {columnIndex}"
        if not 0 <= rowIndex < self.GetNumberOfRows():
            return f"vtkMRMLTableNode::{method} failed: invalid row index: {rowIndex}"
        return None

    def SetCellText(self, rowIndex, columnIndex, text):
        """False (and an error logged) for a cell outside the table, as in Slicer."""
        error = self._cellIndexError("SetCellText", rowIndex, columnIndex)
        if error:
            logging.error(error)
            return False
        self._columns[columnIndex].SetValue(rowIndex, str(text))
        return True

    def GetCellText(self, rowIndex, columnIndex):
        """"" (and an error logged) for a cell outside the table, as in Slicer."""
        error = self._cellIndexError("GetCellText", rowIndex, columnIndex)
        if error:
            logging.error(error)
            return ""
        return self._columns[columnIndex].GetValue(rowIndex)

    def GetColumnName(self, columnIndex):
        return self._columnNames[columnIndex]

    def GetNumberOfRows(self):
        return self._columns[0].GetNumberOfValues() if self._columns else 0


class vtkMRMLLayoutNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLLayoutNode.h: two of the standard layouts' enum, the module's and Slicer's default."""
    SlicerLayoutConventionalView = 2
    SlicerLayoutFourUpTableView = 34


class vtkMRMLSelectionNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLSelectionNode.h: the active table (``GetActiveTableID`` / ``SetActiveTableID``)."""

    def __init__(self):
        super().__init__()
        self._activeTableID = None

    def GetActiveTableID(self):
        return self._activeTableID

    def SetActiveTableID(self, id):
        self._activeTableID = id


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLSubjectHierarchyNode.h: a tree of items, each maybe holding a data node."""

    _INVALID_ITEM_ID = 0   # the header's static const has no Python binding; GetInvalidItemID() is its accessor

    @staticmethod
    def GetInvalidItemID():
        return vtkMRMLSubjectHierarchyNode._INVALID_ITEM_ID

    def __init__(self):
        super().__init__()
        self._sceneItem = 1
        self._nextItem = 2
        self._parent = {self._sceneItem: self._INVALID_ITEM_ID}
        self._dataNode = {}     # item -> node ID
        self._names = {self._sceneItem: "Scene"}

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        return scene._subjectHierarchy

    def GetSceneItemID(self):
        return self._sceneItem

    def _newItem(self, parentItemID, name, dataNodeID=None):
        item = self._nextItem
        self._nextItem += 1
        self._parent[item] = parentItemID
        self._names[item] = name
        if dataNodeID:
            self._dataNode[item] = dataNodeID
        return item

    def CreateSubjectItem(self, parentItemID, name):
        return self._newItem(parentItemID, name)

    def CreateStudyItem(self, parentItemID, name):
        return self._newItem(parentItemID, name)

    def GetItemByDataNode(self, dataNode):
        for item, nodeID in self._dataNode.items():
            if nodeID == dataNode.GetID():
                return item
        return self._INVALID_ITEM_ID

    def GetItemParent(self, itemID):
        return self._parent.get(itemID, self._INVALID_ITEM_ID)

    def SetItemParent(self, itemID, parentItemID, enableCircularCheck=True):
        if itemID in self._parent and parentItemID in self._parent:
            self._parent[itemID] = parentItemID

    def _removeDataNodeItem(self, nodeID):
        for item in [i for i, n in self._dataNode.items() if n == nodeID]:
            del self._dataNode[item]
            del self._parent[item]


# ----------------------------------------------------------------------------- scene, logic, app

_SUBJECT_HIERARCHY_CLASSES = ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode")


class vtkMRMLScene:
    """Libs/MRML/Core/vtkMRMLScene.h: nodes by ID; data nodes get a subject hierarchy item on adding,
    as Slicer's subject hierarchy plugins do."""

    def __init__(self):
        self._nodes = []
        self._counters = {}
        self._uniqueNames = {}
        self._subjectHierarchy = vtkMRMLSubjectHierarchyNode()

    def AddNode(self, node):
        className = node.GetClassName()
        self._counters[className] = self._counters.get(className, 0) + 1
        node._id = f"{className}{self._counters[className]}"
        node._scene = self
        if not node.GetName():
            node.SetName(self.GenerateUniqueName(className.replace("vtkMRML", "").replace("Node", "")))
        self._nodes.append(node)
        if any(node.IsA(c) for c in _SUBJECT_HIERARCHY_CLASSES):
            sh = self._subjectHierarchy
            sh._newItem(sh.GetSceneItemID(), node.GetName(), node.GetID())
        return node

    def AddNewNodeByClass(self, className, nodeBaseName=""):
        cls = globals().get(className)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, vtkMRMLNode):
            raise NotImplementedError(f"stand-in has no node class {className}")
        node = cls()
        if nodeBaseName:
            node.SetName(nodeBaseName)   # as given: Slicer does not make it unique, so names can repeat
        return self.AddNode(node)

    def RemoveNode(self, node):
        """vtkMRMLScene::RemoveNode: each node that referred to it runs vtkMRMLNode::UpdateReferences, which
        drops every reference of that node to a node not in the scene."""
        if node in self._nodes:
            self._nodes.remove(node)
            self._subjectHierarchy._removeDataNodeItem(node.GetID())
            node._scene = None
            for other in self._nodes:
                if node.GetID() in other._references.values():
                    other._references = {role: nodeID for role, nodeID in other._references.items()
                                         if not nodeID or self.GetNodeByID(nodeID) is not None}

    def GetNodeByID(self, nodeID):
        for node in self._nodes:
            if node.GetID() == nodeID:
                return node
        return None

    def GetFirstNodeByName(self, name):
        for node in self._nodes:
            if node.GetName() == name:
                return node
        return None

    def GetNumberOfNodes(self):
        return len(self._nodes)

    def GetNthNode(self, n):
        return self._nodes[n]

    def GenerateUniqueName(self, baseName):
        """vtkMRMLScene::GenerateUniqueName: "x", "x_1", ...: the first index after the last one handed out
        for ``baseName`` (UniqueNames) whose name no node has; a name handed out is not handed out again."""
        index = self._uniqueNames.get(baseName, -1) + 1
        while self.GetFirstNodeByName(f"{baseName}_{index}" if index else baseName):
            index += 1
        self._uniqueNames[baseName] = index
        return f"{baseName}_{index}" if index else baseName

    def Clear(self, removeSingletons=0):
        """vtkMRMLScene::Clear: every node removed, and the IDs and names handed out forgotten."""
        for node in list(self._nodes):
            self.RemoveNode(node)
        self._counters.clear()
        self._uniqueNames.clear()


class vtkSlicerSegmentationsModuleLogic:
    """Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.h (two overloads used)."""

    def ImportLabelmapToSegmentationNode(self, labelmapNode, segmentationNode, updatedSegmentIDs):
        """Overload ``(vtkMRMLLabelMapVolumeNode*, vtkMRMLSegmentationNode*, vtkStringArray* updatedSegmentIDs)``:
        label value v goes to segment ``updatedSegmentIDs[v-1]``; segments keep name, colour and tags."""
        if not isinstance(updatedSegmentIDs, _vtk.vtkStringArray):
            raise NotImplementedError("stand-in implements only the vtkStringArray overload")
        segmentation = segmentationNode.GetSegmentation()
        if labelmapNode is None or labelmapNode.GetImageData() is None:
            return False
        if labelmapNode.GetTransformNodeID() != segmentationNode.GetTransformNodeID():
            raise NotImplementedError("stand-in does not resample: the labelmap and the segmentation "
                                      "have different parent transforms")
        if segmentation.GetSourceRepresentationName() != _BINARY_LABELMAP:
            return False   # Slicer: "source representation ... is not binary labelmap"
        labels = labelmapNode._array
        for index in range(updatedSegmentIDs.GetNumberOfValues()):
            segmentId = updatedSegmentIDs.GetValue(index)
            if not segmentId:
                continue   # Slicer skips an empty ID, and adds a segment named after an unknown one
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                segmentation.AddEmptySegment(segmentId, segmentId)
                segment = segmentation.GetSegment(segmentId)
            segment._mask = (labels == index + 1).astype(np.uint8)
            segment._ijkToRAS = labelmapNode._ijkToRAS.copy()
        return True

    def ExportSegmentsToLabelmapNode(self, segmentationNode, segmentIDs, labelmapNode, referenceVolumeNode=None,
                                     extentComputationMode=vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS,
                                     colorTableNode=None):
        """Segments ``segmentIDs`` (vtkStringArray) -> label values 1..N in ``labelmapNode``, in the reference
        volume's geometry. Slicer resamples a segment stored in another geometry (one that differs from
        the reference by 1e-4 or more in any IJK-to-RAS element: vtkOrientedImageDataResample's
        DoGeometriesMatch); the stand-in refuses that case.
        ``extentComputationMode``: Slicer's default, as here; whatever the mode, the stand-in exports
        the reference volume's whole extent, as arrayFromSegmentBinaryLabelmap gives.
        Without ``colorTableNode``, and only once the export has succeeded, Slicer adds a colour table
        node named ``<labelmap name>_ColorTable`` to the labelmap's scene; so does the stand-in. (Older
        slicer.util's arrayFromSegmentBinaryLabelmap leaves it there; current Slicer removes it.)"""
        if referenceVolumeNode is None:
            raise NotImplementedError("stand-in needs a reference volume")
        if referenceVolumeNode.GetTransformNodeID() != segmentationNode.GetTransformNodeID():
            raise NotImplementedError("stand-in does not resample: the reference volume and the segmentation "
                                      "have different parent transforms")
        shape = referenceVolumeNode._array.shape
        out = np.zeros(shape, dtype=np.int16)
        for index in range(segmentIDs.GetNumberOfValues()):
            segment = segmentationNode.GetSegmentation().GetSegment(segmentIDs.GetValue(index))
            if segment is None:
                return False
            if segment._mask is None:
                continue
            if (segment._mask.shape != shape
                    or not np.all(np.abs(segment._ijkToRAS - referenceVolumeNode._ijkToRAS) < _GEOMETRY_TOLERANCE)):
                raise NotImplementedError("stand-in does not resample: segment geometry differs from the reference volume")
            out[segment._mask > 0] = index + 1
        labelmapNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())   # as Slicer does
        labelmapNode._array = out
        labelmapNode._ijkToRAS = referenceVolumeNode._ijkToRAS.copy()
        if colorTableNode is None and labelmapNode._scene is not None:
            colorTable = vtkMRMLColorTableNode()
            colorTable.SetName(labelmapNode.GetName() + "_ColorTable")
            colorTable.SetTypeToUser()
            labelmapNode._scene.AddNode(colorTable)
        return True


class _Segmentations:
    def __init__(self):
        self._logic = vtkSlicerSegmentationsModuleLogic()

    def logic(self):
        return self._logic


class _Modules:
    """``slicer.modules``: only ``segmentations`` (qSlicerSegmentationsModule::logic())."""

    def __init__(self):
        self.segmentations = _Segmentations()


class vtkSlicerApplicationLogic:
    """Base/Logic/vtkSlicerApplicationLogic.h, with what it inherits from vtkMRMLApplicationLogic.h (Libs/MRML/Logic):
    the selection node and ``PropagateTableSelection``. The stand-in has no table views to show the active
    table in: propagating does nothing."""

    def __init__(self):
        self._selectionNode = vtkMRMLSelectionNode()

    def GetSelectionNode(self):
        return self._selectionNode

    def PropagateTableSelection(self):
        pass


class qSlicerLayoutManager:
    """Base/QTGUI/qSlicerLayoutManager.h (qMRMLLayoutManager.h): the ``layout`` property and its ``setLayout(int)``."""

    def __init__(self):
        self.layout = vtkMRMLLayoutNode.SlicerLayoutConventionalView   # what Slicer starts in, by default

    def setLayout(self, layout):
        self.layout = int(layout)


class _Application:
    """``slicer.app`` (Base/QTGUI/qSlicerApplication.h, Base/QTCore/qSlicerCoreApplication.h): temporaryPath,
    testingEnabled, processEvents, layoutManager, applicationLogic."""

    def __init__(self):
        self.temporaryPath = tempfile.gettempdir()
        self._testingEnabled = False
        self._layoutManager = qSlicerLayoutManager()
        self._applicationLogic = vtkSlicerApplicationLogic()

    def testingEnabled(self):
        return self._testingEnabled

    def layoutManager(self):
        return self._layoutManager

    def applicationLogic(self):
        return self._applicationLogic

    def processEvents(self):
        _qt._runDueTimers()


mrmlScene = vtkMRMLScene()
app = _Application()
modules = _Modules()

from . import util  # noqa: E402  (util refers back to this package)
