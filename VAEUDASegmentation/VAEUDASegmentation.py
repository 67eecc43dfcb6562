"""VAE-UDA Segmentation: the 3D Slicer module (panel, batch logic, self-test).

Segments LV myocardium, LA blood cavity, LV blood cavity and ascending aorta in a modality without
labels (CT) by adapting a model trained on labelled MR, after Ouyang et al., MICCAI 2019.

The module is thin. It computes nothing with torch (the PyTorch extension's installer imports it
into Slicer once, the first time it installs it): every long task runs the ``vaeuda`` engine that ships
beside this file as a child process (``PythonSlicer -m vaeuda <command> --progress json ...``),
reads its JSON progress lines, and moves results between the scene and files in a temporary
folder that is always deleted afterwards. ``VAEUDASegmentationLib/engineprocess.py`` (plain
Python, no Slicer) runs and cancels one such process; :class:`VAEUDASegmentationLogic` is the batch
API for the Python console; :class:`VAEUDASegmentationWidget` is the panel.
"""

import contextlib
import inspect
import json
import logging
import math
import os
import pathlib
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Dict, List, Optional, Sequence, Tuple

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper, unannotatedType)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# The engine's table of structures is the one source of names, values, colours and codes, and its
# output checks the one source of what an output path may be. vaeuda/__init__.py, labels.py,
# fileio.py and errors.py import only numpy and the standard library, never torch.
from vaeuda import choices as vaeudaChoices
from vaeuda import fileio as vaeudaFileio
from vaeuda import labels as vaeudaLabels
from vaeuda.errors import MAX_BATCH_SIZE, MAX_ITERATIONS, MAX_SEED, VaeudaError, require_count
# The child-process runner is plain Python, in its own file; the job errors are part of the batch API.
from VAEUDASegmentationLib.engineprocess import EngineProcess, JobCancelledError, JobFailedError, JobResult

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS_PATH = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
TORCH_REQUIREMENT = ">=2.1"
# Packages Slicer ships: never installed, upgraded or replaced by this module.
SLICER_OWNED_PACKAGES = ("numpy", "SimpleITK")
# Installed by the PyTorch extension for this computer's driver: pip must not replace them while
# it installs the requirements (a requirement that wants a newer torch would otherwise pull a
# PyPI build over the loaded one, CPU-only on Windows).
PYTORCH_EXTENSION_PACKAGES = ("torch", "torchvision")

STRUCTURES = vaeudaLabels.STRUCTURES
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE_CATEGORY = "SCT^123037004^Anatomical Structure"
MODEL_FORMAT = "vaeuda-model"   # safetensors header field "format" of an engine model file


def terminologyEntry(structure) -> str:
    """Slicer's ``TerminologyEntry`` segment tag for a structure of :data:`vaeuda.labels.STRUCTURES`.

    Seven ``~``-separated parts (Slicer Docs, developer_guide/modules/segmentations.md): context,
    category, type, type modifier, anatomic context, anatomic region, region modifier; codes are
    ``scheme^value^meaning`` with SNOMED CT (``SCT``) codes from the label table.
    """
    return "~".join([TERMINOLOGY_CONTEXT, ANATOMICAL_STRUCTURE_CATEGORY,
                     f"SCT^{structure.snomed_code}^{structure.snomed_meaning}", "^^",
                     ANATOMIC_CONTEXT, "^^", "^^"])


# What ExportSegmentsToLabelmapNode names the colour table it adds for arrayFromSegmentBinaryLabelmap's
# temporary labelmap "__temp__" (vtkSlicerSegmentationsModuleLogic.cxx: the labelmap's name + "_ColorTable").
TEMPORARY_COLOR_TABLE = "__temp___ColorTable"


def _temporaryColorTableIds() -> set:
    return {node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLColorTableNode")
            if node.GetName() == TEMPORARY_COLOR_TABLE}


def segmentMask(segmentationNode, segmentId: str, referenceVolume) -> np.ndarray:
    """slicer.util.arrayFromSegmentBinaryLabelmap (the segment in the reference volume's geometry,
    (K, J, I)), without the colour table node the export adds to the scene and that older
    slicer.util leaves there: one node per call would pile up in the user's scene. Only the table
    this call added is removed; scene names are not unique, so older ones of that name stay."""
    VAEUDASegmentationLogic._requireNode(segmentationNode, "vtkMRMLSegmentationNode", "segmentMask's segmentation")
    before = _temporaryColorTableIds()
    try:
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolume)
    finally:
        for nodeId in _temporaryColorTableIds() - before:
            slicer.mrmlScene.RemoveNode(slicer.mrmlScene.GetNodeByID(nodeId))


def readModelMetadata(modelPath) -> dict:
    """The ``meta`` JSON of a ``vaeuda`` model file, read from its safetensors header.

    A safetensors file starts with an 8-byte little-endian header length and a JSON header whose
    ``__metadata__`` holds the engine's string fields; reading it needs neither torch nor the
    safetensors package. Raises ValueError naming the file if it is not a VAE-UDA model file.
    """
    path = str(modelPath)
    try:
        with open(path, "rb") as f:
            lengthBytes = f.read(8)
            if len(lengthBytes) != 8:
                raise ValueError
            (length,) = struct.unpack("<Q", lengthBytes)
            if length > 100_000_000:
                raise ValueError
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{path}: not a VAE-UDA model file (no readable safetensors header).") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a VAE-UDA model file (a safetensors file without the '{MODEL_FORMAT}' metadata).")
    try:
        meta = json.loads(metadata.get("meta") or "{}")
    except (TypeError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the model file's metadata is damaged.")
    return meta


def labelValuesOfModel(meta: dict) -> Optional[List[int]]:
    """Label-file value of each class index 0..4 for a model's metadata, or None if it does not say.

    The engine writes segmentations with its label convention's ``from_index`` (vaeuda/labels.py
    ``Convention``); the metadata keeps that convention under ``labels`` (directly or as
    ``labels.convention``).
    """
    labels = meta.get("labels")
    if isinstance(labels, dict) and isinstance(labels.get("convention"), dict):
        labels = labels["convention"]
    if isinstance(labels, dict) and isinstance(labels.get("from_index"), list) \
            and len(labels["from_index"]) == vaeudaLabels.N_CLASSES:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels["from_index"]):
            raise ValueError(f"the model file's label values {labels['from_index']!r} are not whole numbers "
                             f"(its metadata is damaged).")
        return list(labels["from_index"])
    return None


def classIndicesFromLabelValues(labelArray: np.ndarray, fromIndex: Optional[Sequence[int]] = None,
                                source: str = "segmentation") -> np.ndarray:
    """Label values written by ``vaeuda segment`` -> class indices 0..4 (uint8, same shape).

    ``fromIndex``: the value of each class index (background first), from the model file. Without
    it the values are read as MM-WHS values (205, 420, 500, 820; other MM-WHS structures are
    background) if they all are, else as consecutive indices 1..4. Raises ValueError naming
    ``source`` for a value that fits neither.
    """
    labelArray = np.asarray(labelArray)
    values = set(int(v) for v in np.unique(labelArray))
    background, ignored = 0, set()
    if fromIndex is not None:
        background = int(fromIndex[0])
        mapping = {int(v): index for index, v in enumerate(fromIndex) if index > 0}
    elif values <= set(vaeudaLabels.MMWHS.to_index):
        mapping = {v: i for v, i in vaeudaLabels.MMWHS.to_index.items() if i > 0}
        ignored = set(vaeudaLabels.MMWHS_OTHER_VALUES)
    else:
        mapping = {s.index: s.index for s in STRUCTURES}
    unknown = sorted(v for v in values - ignored if v != background and v not in mapping)
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:8])
        raise ValueError(f"{source}: label values {shown} are not values of the model's structures.")
    classes = np.zeros(labelArray.shape, dtype=np.uint8)
    for value, index in mapping.items():
        classes[labelArray == value] = index
    return classes


@dataclass
class TryItCohort:
    """What :meth:`VAEUDASegmentationLogic.makeTryItCohort` made: the cohort folder (MR and CT
    volumes with labels, ``splits.json``); ``sourceTrainingFolder``, its labelled MR training
    volumes alone (what a source model trains on: the cohort folder also holds labelled CT); and
    the CT volume and its reference segmentation loaded into the scene (None when not loaded)."""
    folder: str
    sourceTrainingFolder: str = ""
    volumeNode: object = None
    referenceSegmentationNode: object = None


# Engine subcommands whose result the module imports into the scene (the others write model files).
SCENE_JOBS = ("segment", "evaluate", "synth")
# ... and the panel's buttons that start them
SCENE_ACTIONS = ("segment", "evaluate", "tryIt")
# How far a volume's IJK-to-RAS axes may be from perpendicular: the engine's own tolerance
# (vaeuda.volumes.GEOMETRY_TOLERANCE, which refuses such a volume in a file; a test holds them equal).
AXES_TOLERANCE = 1e-4
# Node reference role from a segmentation to the table the panel's Evaluate filled for it: found by node ID, so a
# renamed table is still that segmentation's; a deleted one is no longer found.
EVALUATION_TABLE_REFERENCE_ROLE = "VAEUDAEvaluationTable"
# ... and from that table back to the segmentation: Slicer copies a node's references when it clones it, so a
# cloned segmentation points at its original's table; the table's back-reference says whose it is.
EVALUATED_SEGMENTATION_REFERENCE_ROLE = "VAEUDAEvaluatedSegmentation"


@dataclass
class _Job:
    name: str   # the engine subcommand
    process: EngineProcess
    tempDir: str
    onSuccess: Optional[Callable[[List[str]], object]]
    progressCallback: Optional[Callable[[dict], None]]
    finishedCallback: Optional[Callable[[JobResult], None]]
    # the job's temporary input files and what the user knows them as ("volume 'ct_1017'")
    pathNames: Dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- module

class VAEUDASegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VAE-UDA Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VAE-UDA Segmentation contributors"]
        self.parent.helpText = """
Segments the LV myocardium, LA blood cavity, LV blood cavity and ascending aorta in a CT (or any
modality without labels) with the data-efficient unsupervised domain adaptation of
Ouyang, Kamnitsas, Biffi, Duan and Rueckert, "Data Efficient Unsupervised Domain Adaptation for
Cross-Modality Image Segmentation", MICCAI 2019.
<br><br>
Workflow: (1) pick a model trained on labelled MR volumes, or train one from a folder of them;
(2) adapt it to one unlabelled CT of the scene, which needs no CT labels at all; (3) segment CT
volumes with the adapted model to get a segmentation with named, coloured segments.
Under "Try it", press "Make a synthetic cohort and load a CT" to run the whole workflow on a small
synthetic MR/CT cohort (offline, after a one-time install of the Python packages).
See the <a href="https://github.com/VAEUDA/SlicerVAEUDASegmentation/blob/main/Docs/slicer.md">user guide</a>.
"""
        self.parent.acknowledgementText = """
The method is that of C. Ouyang, K. Kamnitsas, C. Biffi, J. Duan and D. Rueckert (MICCAI 2019).
The module follows the designs of Slicer's scripted module template, SlicerMONAIAuto3DSeg,
SlicerTotalSegmentator, SlicerNNUNet and SlicerPyTorch.
"""


# ----------------------------------------------------------------------------- parameter node

@parameterNodeGuiConnector
class PathLineEditToTextConnector(GuiConnector):
    """Binds a ctkPathLineEdit to a ``str`` parameter, as Slicer's ctkPathLineEditToPathConnector
    (parameterNodeWrapper/guiConnectors.py) binds it to ``pathlib.Path``. A Path cannot be empty:
    ``Path("")`` is ``Path(".")``, so an unset model file would read "." in its field. As text it
    stays empty."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        if PathLineEditToTextConnector.canRepresent(widget, datatype):
            return PathLineEditToTextConnector(widget)
        return None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath

    def write(self, value: str) -> None:
        self._widget.currentPath = value


# The parameters a PathLineEditToTextConnector shows (model files, and a folder that must be clearable).
PATH_TEXT_PARAMETERS = ("sourceModelPath", "trainOutputModelPath", "adaptedModelPath", "segmentModelPath",
                        "adaptSourceDataFolder")


@parameterNodeWrapper
class VAEUDASegmentationParameterNode:
    """The panel's state, saved with the scene. Model files are text (empty: not chosen; see
    PathLineEditToTextConnector), so is the adaptation's source-data folder, which may be emptied; the
    training folder a ctkDirectoryButton shows, which displays any empty folder as "." whatever its
    type, is a ``pathlib.Path``."""
    sourceModelPath: str
    trainDataFolder: pathlib.Path
    trainOutputModelPath: str
    adaptedModelPath: str
    adaptIterations: Annotated[int, WithinRange(0, 10_000_000)] = 0
    adaptSourceDataFolder: str            # empty: the source model's own record
    inputVolume: vtkMRMLScalarVolumeNode
    segmentModelPath: str
    outputSegmentation: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(list(vaeudaChoices.DEVICES))] = "auto"
    preset: Annotated[str, Choice(["auto", *vaeudaChoices.PANEL_PRESET_NAMES])] = "auto"
    seed: Annotated[int, WithinRange(0, 2_147_483_647)] = 0
    trainIterations: Annotated[int, WithinRange(0, 10_000_000)] = 0
    trainBatchSize: Annotated[int, WithinRange(0, 512)] = 0       # 0: the preset's (training and adaptation)
    segmentBatchSize: Annotated[int, WithinRange(0, 1024)] = 0    # 0: the engine's (which has no bound)
    cpuBf16: bool = False
    portable: bool = False
    intensityRemap: bool = False


def _namePaths(message: str, pathNames: Dict[str, str]) -> str:
    """``message`` with each temporary file named as the user knows it: the engine's sentences name
    the file they are about ("/tmp/.../input.nii.gz: ..." becomes "Volume 'ct_1017': ...")."""
    for path in sorted(pathNames, key=len, reverse=True):   # a path may begin another one
        message = message.replace(path, pathNames[path])
    if any(message.startswith(name) for name in pathNames.values()):
        message = message[:1].upper() + message[1:]   # the sentence's start
    return message


@contextlib.contextmanager
def _engineCheckAsValueError():
    """The engine's input checks raise VaeudaError; the batch API refuses bad arguments with ValueError."""
    try:
        yield
    except VaeudaError as exc:
        raise ValueError(_asArguments(str(exc))) from None     # its flags named as the API's arguments


def _volumeName(node) -> str:
    return f"volume '{node.GetName()}'"


def _sourceVolumes(sourceData: Optional[str], meta: dict) -> List[str]:
    """The labelled source volumes an adaptation reads: the files of ``sourceData`` (a folder or a
    volume), else those the source model's provenance records."""
    if sourceData is None:
        provenance = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
        return [str(p) for key in ("source_data", "source_labels") for p in provenance.get(key) or []
                if isinstance(p, str)]
    if os.path.isdir(sourceData):
        return [os.path.join(sourceData, name) for name in os.listdir(sourceData)]
    # one image: the engine reads its X_label twin beside it too (the name's role in any case)
    base = vaeudaFileio.without_role(vaeudaFileio.stem(sourceData), "_image")
    folder = os.path.dirname(sourceData) or "."
    twins = [] if base is None or not os.path.isdir(folder) else [
        os.path.join(folder, name) for name in os.listdir(folder)
        if vaeudaFileio.stem(name).casefold() == (base + "_label").casefold()]
    return [sourceData, *twins]


def _conventionArgument(labelConvention):
    """``labelConvention`` for the engine, which runs in a temporary folder: a mapping file's path made
    absolute; a built-in name ("mmwhs", "consecutive") and None as they are. Anything else (a
    mistyped name, a file that is not there) is refused here, before the job: the engine would
    name a path in its temporary folder."""
    if labelConvention is None or (isinstance(labelConvention, str)
                                   and labelConvention in vaeudaLabels.BUILTIN_CONVENTIONS):
        return labelConvention
    builtins = ", ".join(f"'{name}'" for name in vaeudaLabels.BUILTIN_CONVENTIONS)
    if not isinstance(labelConvention, (str, os.PathLike)) or not str(labelConvention):
        raise ValueError(f"labelConvention must be a built-in convention ({builtins}) or a label-mapping JSON file, "
                         f"not {labelConvention!r}.")
    path = os.path.abspath(_userPath(labelConvention))
    if not os.path.isfile(path):
        raise ValueError(f"labelConvention {str(labelConvention)!r} is neither a built-in convention ({builtins}; "
                         f"lower case) nor an existing label-mapping JSON file.")
    return path


def _pathOrNone(path) -> Optional[str]:
    text = "" if path is None else str(path)
    return None if text in ("", ".") else text


# The job running in this Slicer, whichever logic instance started it (the panel's, or one made in
# the Python console): two engines at once would contend for the cores, or write the same model.
_RUNNING_JOB: List[Optional["_Job"]] = [None]
# The reference's file in an evaluation's temporary folder, and the start of the engine's note on the
# structures it lacks, which evaluate() gives itself in segment names.
EVALUATION_REFERENCE_FILE = "case_label.nii.gz"
_ENGINE_REFERENCE_NOTE = vaeudaLabels.REFERENCE_LACKS_NOTE.split("{keys}")[0].format(reference=EVALUATION_REFERENCE_FILE)
# The engine's checkpoint lives in the job's temporary folder, which goes when the job ends.
CANCEL_TIP = ("Cancel the running job. A cancelled training or adaptation keeps nothing: the next run starts "
              "from its first iteration.")
# What each engine job is doing, as a sentence names it.
JOB_DESCRIPTIONS = {"synth": "making a synthetic cohort", "train-source": "training a source model",
                    "adapt": "adapting a model", "segment": "segmenting", "evaluate": "evaluating"}


def _finiteNumber(value) -> Optional[float]:
    """A progress field as a number, or None for anything else (text, NaN, infinity, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _duration(seconds: float) -> str:
    """A time left as the status line shows it: "2 min 5 s", or "3 h 4 min" past an hour."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s"


def _userPath(path):
    """A path as typed in the console, with ``~`` expanded (no shell does it here); None stays None."""
    return None if path is None else os.path.expanduser(str(path))


# The engine's sentences name its command-line flags; the batch API's callers know its arguments.
_ENGINE_FLAGS = {"--source-data": "sourceDataFolder", "--iterations": "iterations", "--seed": "seed",
                 "--portable": "portable", "--cpu-bf16": "cpuBf16", "--label-convention": "labelConvention",
                 "--input-size": "inputSize", "--n-source": "nSource", "--n-target": "nTarget",
                 "--n-train": "nTrain", "--size": "size", "--preset": "preset", "--device": "device",
                 "--batch-size": "batchSize"}


def _asArguments(message: str) -> str:
    """An engine sentence with its flags named as the batch API's arguments (``--source-data`` ->
    ``sourceDataFolder``); the longest first, since one flag may begin another."""
    for flag in sorted(_ENGINE_FLAGS, key=len, reverse=True):
        message = re.sub(re.escape(flag) + r"(?![\w-])", _ENGINE_FLAGS[flag], message)
    return message


def _requireCount(name: str, value, minimum: int = 1, noneForDefault: bool = True,
                  maximum: Optional[int] = None) -> None:
    """Refuse a count argument (None: the engine's default, where ``noneForDefault``) that the engine
    would refuse only after starting: the engine's check, as ValueError."""
    if value is not None or not noneForDefault:
        with _engineCheckAsValueError():
            require_count(name, value, minimum, default_hint=" (or None for the default)" if noneForDefault else "",
                          maximum=maximum)


def _ijkToRAS(volumeNode) -> np.ndarray:
    """A volume node's IJK-to-RAS matrix, 4 x 4, as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _requireFlag(name: str, value) -> None:
    """Refuse an on/off argument that is not True or False: the text "False" is true to Python, and
    would switch the option on."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, not {value!r}.")


def _requireCallback(name: str, value) -> None:
    """Refuse a callback that cannot be called (it would fail at every event, logged, the job going on)."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a function (or None), not {value!r}.")


# ----------------------------------------------------------------------------- widget

class VAEUDASegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Try it, Model, Adapt, Segment, Evaluate, Advanced; a progress bar and a log.

    Every engine job runs in the background; the button that started it reads "Cancel" until it ends.
    """

    ACTION_LABELS = {"tryIt": "Making the synthetic cohort", "train": "Training the source model",
                     "adapt": "Adapting the model", "segment": "Segmenting", "evaluate": "Evaluating"}
    # The batch API's arguments, which a failed job's sentence may name, as the panel's fields (by action
    # where one argument is two fields)
    _TRAINING_BATCH = "'Training batch size' (Advanced)"
    PANEL_FIELDS = {"sourceDataFolder": {"adapt": "'Source training data' (2. Adapt)"},
                    "batchSize": {"train": _TRAINING_BATCH, "adapt": _TRAINING_BATCH,
                                  "segment": "'Segmentation batch size' (Advanced)"},
                    "inputSize": {"train": "input size (no panel field: trainSource's inputSize in the console)"}}
    # What a disabled button waits for (its tooltip then)
    NOT_READY = {"tryIt": "",
                 "train": "Choose the training data folder and the output model file first.",
                 "adapt": "Choose the source model, where to write the adapted model, and a target volume (or an "
                          "input volume in 3. Segment) first.",
                 "segment": "Choose the input volume and the model first.",
                 "evaluate": "Segment first (or choose the segmentation in 3. Segment's output), and choose the "
                             "reference segmentation."}

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runningAction = None
        self._segmentedVolumes: Dict[str, str] = {}   # segmentation node ID -> the volume Apply segmented into it
        self._inputVolumeID: Optional[str] = None     # the input volume the panel last showed

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VAEUDASegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VAEUDASegmentationLogic()
        self._actionButtons = {"tryIt": self.ui.tryItButton, "train": self.ui.trainButton,
                               "adapt": self.ui.adaptButton, "segment": self.ui.applyButton,
                               "evaluate": self.ui.evaluateButton}
        self._buttonTexts = {name: button.text for name, button in self._actionButtons.items()}
        self._buttonTips = {name: button.toolTip for name, button in self._actionButtons.items()}

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.tryItButton.connect("clicked(bool)", self.onTryItButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   self.ui.segmentationShow3DButton.setSegmentationNode)
        # Not a parameter-node value (its checks live in the scene), so Adapt's state follows it here.
        self.ui.targetVolumesSelector.connect("checkedNodesChanged()", self._updateButtonStates)
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = "Idle"
        self.initializeParameterNode()

    def cleanup(self) -> None:
        # Leaving Slicer (or reloading) must not leave an engine process running.
        # Its callbacks would reach this widget's deleted Qt objects, so they are dropped too;
        # so are the parameter node's connections to those widgets (the node outlives a reload).
        if self.logic is not None and self.logic.isRunning():
            self.logic.cancel(detach=True)
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # A running segment, evaluate or Try-it job's result belongs to the scene being closed (its
        # volume, its segmentation), even when the engine has just ended: cancelled, it reports back
        # to the panel, which shows it and becomes ready again, and nothing is imported into the next
        # scene (one that had already failed reports its failure). Training and adaptation need no
        # scene once started (their inputs were written to files) and make a file: they go on,
        # perhaps for hours of work that closing must not lose.
        if self._runningAction in SCENE_ACTIONS:
            if self.logic is not None and self.logic.isRunning():
                self.logic.cancel(discardFinished=True)
        elif self._runningAction is not None:
            action = self.ACTION_LABELS[self._runningAction].lower()
            self.ui.logTextEdit.appendPlainText(f"The scene was closed; {action} goes on (its result is a file). "
                                                f"Its button cancels it.")
        self._segmentedVolumes.clear()           # the next scene numbers its node IDs afresh
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        for name in PATH_TEXT_PARAMETERS:    # scenes saved with Path parameters kept an unset file as "."
            if getattr(self._parameterNode, name) == ".":
                setattr(self._parameterNode, name, "")
        if not self._parameterNode.inputVolume:
            firstVolumeNode = self.logic.defaultInputVolume()
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._inputVolumeID = self._parameterNode.inputVolume.GetID() if self._parameterNode.inputVolume else None
            self._updateButtonStates()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        inputID = p.inputVolume.GetID() if p is not None and p.inputVolume else None
        if p is not None and inputID != self._inputVolumeID:
            self._inputVolumeID = inputID
            # Another input volume chosen: the segmentation Apply made for another volume is no output
            # for it (the next Apply would replace its segments, under the other volume's name).
            madeFor = self._segmentedVolumes.get(p.outputSegmentation.GetID()) if p.outputSegmentation else None
            if inputID is not None and madeFor not in (None, inputID):
                p.outputSegmentation = None      # (modifies the node: this runs again, and passes)
                return
        self._updateButtonStates()

    def _settingsConflict(self, name: str) -> Optional[str]:
        """Why the Advanced settings keep button ``name`` from running (the engine would refuse them), or None."""
        p = self._parameterNode
        if name not in ("train", "adapt", "segment") or not p.portable:
            return None
        if p.device == "cuda":
            return "Portable numerics runs on the CPU: set Device to auto or cpu, or uncheck it (Advanced)."
        if name == "segment" and p.cpuBf16:
            return ("Portable numerics computes in float32: uncheck it or 'Faster segmentation on the CPU (bf16)' "
                    "(Advanced).")
        return None

    def _updateButtonStates(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        ready = {"tryIt": True,
                 "train": bool(_pathOrNone(p.trainDataFolder) and _pathOrNone(p.trainOutputModelPath)),
                 "adapt": bool(_pathOrNone(p.sourceModelPath) and _pathOrNone(p.adaptedModelPath)
                               and (self.ui.targetVolumesSelector.checkedNodes() or p.inputVolume)),
                 "segment": bool(p.inputVolume and _pathOrNone(p.segmentModelPath)),
                 "evaluate": bool(p.outputSegmentation and p.referenceSegmentation)}
        for name, button in self._actionButtons.items():
            if self._runningAction is None:
                conflict = self._settingsConflict(name) if ready[name] else None
                button.enabled = ready[name] and conflict is None
                button.text = self._buttonTexts[name]
                button.toolTip = conflict or (self._buttonTips[name] if ready[name] else self.NOT_READY[name])
            else:
                # While a job runs, only its own button is active, and it cancels the job.
                button.enabled = name == self._runningAction
                button.text = "Cancel" if name == self._runningAction else self._buttonTexts[name]
                button.toolTip = (CANCEL_TIP if name == self._runningAction
                                  else "Another job is running; wait for it or cancel it.")

    # -- running jobs

    def _ensureRequirements(self) -> None:
        if not self.logic.setupPythonRequirements(askConfirmation=True):
            raise RuntimeError("VAE-UDA Segmentation needs Python packages that are not installed: "
                               + ", ".join(self.logic.missingPythonRequirements())
                               + ". Press the button again to install them (it asks first, and needs the network "
                                 "once); if the installation failed or the PyTorch extension is missing, the message "
                                 "shown before this one says what to do.")

    def _runAction(self, name: str, start: Callable[[], None]) -> None:
        """Start the job of button ``name``, or cancel it if it is the one running."""
        if self._runningAction == name:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        with slicer.util.tryWithErrorDisplay(f"{self.ACTION_LABELS[name]} could not start.", waitCursor=True):
            self._ensureRequirements()
            self._runningAction = name
            self._updateButtonStates()
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = f"{self.ACTION_LABELS[name]}..."
            self.ui.logTextEdit.appendPlainText(f"--- {self.ACTION_LABELS[name]}")
            try:
                start()
            except Exception as exc:
                self._runningAction = None
                self._updateButtonStates()
                self.ui.statusLabel.text = f"{self.ACTION_LABELS[name]} could not start."
                self.ui.logTextEdit.appendPlainText(f"Could not start: {exc}")
                raise

    def _onProgress(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "stage":
            self.ui.statusLabel.text = f"{event.get('stage', '')}..."
            self.ui.progressBar.setValue(0)
        elif kind == "progress":
            fraction = _finiteNumber(event.get("fraction"))
            if fraction is not None:
                self.ui.progressBar.setValue(int(round(100 * min(max(fraction, 0.0), 1.0))))
            eta = _finiteNumber(event.get("eta_s"))
            etaText = f", about {_duration(eta)} left" if eta is not None and 0 <= eta < 100 * 3600 else ""
            step, total = (_finiteNumber(event.get(key)) for key in ("step", "total"))
            counted = f": {int(step)}/{int(total)}" if step is not None and total is not None else ""
            self.ui.statusLabel.text = f"{event.get('stage', '')}{counted}{etaText}"
        elif kind == "log":
            self.ui.logTextEdit.appendPlainText(str(event.get("message", "")))
        # (an "error" event is the job's failure, which _finishAction shows in the panel's own terms)
        elif kind == "table":   # evaluate's Markdown table
            self.ui.logTextEdit.appendPlainText(str(event.get("markdown", "")))

    def _finishAction(self, result: JobResult) -> bool:
        """Reset the panel after a job; show its error. True if it succeeded."""
        name = self._runningAction
        self._runningAction = None
        self._updateButtonStates()
        label = self.ACTION_LABELS.get(name, "The job")
        if result.status == "done":
            self.ui.progressBar.setValue(100)
            self.ui.statusLabel.text = f"{label}: done."
            return True
        self.ui.progressBar.setValue(0)
        if result.status == "cancelled":
            self.ui.statusLabel.text = f"{label}: cancelled."
            self.ui.logTextEdit.appendPlainText("Cancelled.")
        else:
            message = self.asPanelFields(name, result.message)
            self.ui.statusLabel.text = f"{label}: failed."
            self.ui.logTextEdit.appendPlainText(f"Failed: {message}")
            slicer.util.errorDisplay(f"{label} failed: {message}")
        return False

    @classmethod
    def asPanelFields(cls, action: Optional[str], message: str) -> str:
        """``message`` with the batch API's argument names given as the fields ``action``'s job reads."""
        for argument, fields in cls.PANEL_FIELDS.items():
            if action in fields:
                message = re.sub(rf"\b{argument}\b", fields[action], message)
        return message

    def _jobOptions(self, finished: Callable[[JobResult], None]) -> dict:
        return {"waitForCompletion": False, "progressCallback": self._onProgress, "finishedCallback": finished}

    # -- buttons

    def onTryItButton(self) -> None:
        folder = self.logic.defaultTryItFolder()
        p = self._parameterNode

        def finished(result: JobResult) -> None:
            if self._finishAction(result):
                cohort = result.value
                p.trainDataFolder = pathlib.Path(cohort.sourceTrainingFolder)
                p.trainOutputModelPath = os.path.join(cohort.folder, "source_model.safetensors")
                p.adaptedModelPath = os.path.join(cohort.folder, "adapted_model.safetensors")
                p.inputVolume = cohort.volumeNode
                p.referenceSegmentation = cohort.referenceSegmentationNode
                # the cohort is small: the cpu preset's defaults train and adapt it in minutes, where
                # "auto" would take the paper preset's hours on a GPU
                p.preset = "cpu"
                p.adaptSourceDataFolder = ""       # the new source model's own record of its MR volumes
                self.ui.targetVolumesSelector.setCheckState(cohort.volumeNode, qt.Qt.Checked)
                self.ui.trainCollapsibleGroupBox.collapsed = False     # the next step, filled in
                # the reference as outlines only, so that a result (filled, in the same colours) stands apart
                referenceDisplay = cohort.referenceSegmentationNode.GetDisplayNode()
                if referenceDisplay:
                    referenceDisplay.SetVisibility2DFill(False)
                self.ui.logTextEdit.appendPlainText(
                    f"Synthetic cohort in {cohort.folder}; training preset set to cpu (minutes): set it back to "
                    f"auto (Advanced) before training on your own data. Next: press 'Train source model' (1. Model), "
                    f"then Adapt, then Apply.")

        self._runAction("tryIt", lambda: self.logic.makeTryItCohort(folder, seed=p.seed,
                                                                    **self._jobOptions(finished)))

    def onTrainButton(self) -> None:
        p = self._parameterNode

        def finished(result: JobResult) -> None:
            if self._finishAction(result):
                p.sourceModelPath = str(result.value)
                if not _pathOrNone(p.segmentModelPath):    # an adapted model chosen to segment with stays chosen
                    p.segmentModelPath = str(result.value)

        self._runAction("train", lambda: self.logic.trainSource(
            _pathOrNone(p.trainDataFolder), _pathOrNone(p.trainOutputModelPath),
            preset=None if p.preset == "auto" else p.preset, iterations=p.trainIterations or None, seed=p.seed,
            device=p.device, batchSize=p.trainBatchSize or None, portable=p.portable, intensityRemap=p.intensityRemap,
            **self._jobOptions(finished)))

    def onAdaptButton(self) -> None:
        p = self._parameterNode
        targets = list(self.ui.targetVolumesSelector.checkedNodes())
        if not targets and p.inputVolume:
            targets = [p.inputVolume]

        def finished(result: JobResult) -> None:
            if self._finishAction(result):
                # The adapted model is remembered in the parameter node and used for segmenting.
                p.adaptedModelPath = str(result.value)
                p.segmentModelPath = str(result.value)

        self._runAction("adapt", lambda: self.logic.adapt(
            _pathOrNone(p.sourceModelPath), targets, _pathOrNone(p.adaptedModelPath),
            iterations=p.adaptIterations or None, seed=p.seed, device=p.device, portable=p.portable,
            batchSize=p.trainBatchSize or None, sourceDataFolder=_pathOrNone(p.adaptSourceDataFolder),
            **self._jobOptions(finished)))

    def onApplyButton(self) -> None:
        p = self._parameterNode
        volume = p.inputVolume      # as it was when Apply was pressed

        def finished(result: JobResult) -> None:
            if self._finishAction(result):
                self._segmentedVolumes[result.value.GetID()] = volume.GetID()
                p.outputSegmentation = result.value

        self._runAction("segment", lambda: self.logic.segment(
            p.inputVolume, _pathOrNone(p.segmentModelPath), p.outputSegmentation, device=p.device,
            cpuBf16=p.cpuBf16, portable=p.portable, batchSize=p.segmentBatchSize or None,
            **self._jobOptions(finished)))

    @staticmethod
    def _evaluationTableOf(table, segmentation) -> bool:
        """Whether ``table`` is ``segmentation``'s own: its back-reference says so or, for a table made
        before it had one, no other segmentation refers to it (a clone's copied reference does)."""
        owner = table.GetNodeReferenceID(EVALUATED_SEGMENTATION_REFERENCE_ROLE)
        if owner is not None:
            return owner == segmentation.GetID()
        return not any(node is not segmentation and node.GetNodeReferenceID(EVALUATION_TABLE_REFERENCE_ROLE)
                       == table.GetID() for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))

    def onEvaluateButton(self) -> None:
        p = self._parameterNode
        segmentation = p.outputSegmentation
        # Evaluating a segmentation again refills the table made for it, even renamed; a deleted one is made anew,
        # and so is one a clone's copied reference points at (the original's).
        table = segmentation.GetNodeReference(EVALUATION_TABLE_REFERENCE_ROLE) if segmentation else None
        if table is not None and not self._evaluationTableOf(table, segmentation):
            table = None

        def finished(result: JobResult) -> None:
            if self._finishAction(result):
                segmentation.SetNodeReferenceID(EVALUATION_TABLE_REFERENCE_ROLE, result.value.GetID())
                result.value.SetNodeReferenceID(EVALUATED_SEGMENTATION_REFERENCE_ROLE, segmentation.GetID())
                slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
                slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(result.value.GetID())
                slicer.app.applicationLogic().PropagateTableSelection()

        self._runAction("evaluate", lambda: self.logic.evaluate(
            segmentation, p.referenceSegmentation, table, **self._jobOptions(finished)))


# ----------------------------------------------------------------------------- logic

class VAEUDASegmentationLogic(ScriptedLoadableModuleLogic):
    """The batch API: train, adapt, segment and evaluate from the Python console, without the panel.

    Each long call runs the engine in a child process. With ``waitForCompletion=True`` (the
    default) it blocks and returns the result, raising :class:`JobFailedError` with the engine's
    error sentence (or :class:`JobCancelledError`); while it waits it processes Qt events, so the
    window keeps painting (a job started meanwhile is refused: one at a time); with ``waitForCompletion=False`` it returns
    at once, reports engine events to ``progressCallback(event)`` and the end to
    ``finishedCallback(JobResult)`` from Qt timer callbacks on the main thread. One job at a time;
    :meth:`cancel` stops it. A failed or cancelled job leaves the scene as it was, and the
    temporary folder of every job is deleted.

    Example (Python console)::

        from VAEUDASegmentation import VAEUDASegmentationLogic
        logic = VAEUDASegmentationLogic()
        logic.setupPythonRequirements()
        segmentation = logic.segment(getNode("ct_1017"), "/data/adapted.safetensors")
    """

    POLL_INTERVAL_MS = 100

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # The engine command line before the subcommand; None: PythonSlicer -m vaeuda. Another
        # command runs an engine with its own Python, which needs none of the engine's packages here.
        self.engineCommand: Optional[List[str]] = None
        self.requirementsPath = REQUIREMENTS_PATH
        self._job: Optional[_Job] = None
        self._requirementsSatisfied = False

    def getParameterNode(self):
        return VAEUDASegmentationParameterNode(super().getParameterNode())

    # -- dependencies

    def _requirements(self) -> List[str]:
        """``torch<TORCH_REQUIREMENT>`` and the lines of Resources/requirements.txt."""
        lines = [f"torch{TORCH_REQUIREMENT}"]
        with open(self.requirementsPath, encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    lines.append(line)
        return lines

    def missingPythonRequirements(self) -> List[str]:
        """Requirements (pip specifiers) not installed in Slicer's Python, or installed too old."""
        from importlib import metadata
        try:
            from packaging.requirements import Requirement
        except ImportError:   # without packaging, only presence is checked
            Requirement = None
        missing = []
        for line in self._requirements():
            name = Requirement(line).name if Requirement else line.split("<")[0].split(">")[0].split("=")[0].strip()
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                missing.append(line)
                continue
            if Requirement and not Requirement(line).specifier.contains(version, prereleases=True):
                missing.append(line)
        return missing

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs into Slicer's Python, asking first. True when all is there.

        torch comes from the PyTorch extension (``PyTorchUtilsLogic().installTorch``, which picks
        the CUDA build matching the driver); the rest from Resources/requirements.txt with
        Slicer's ``pip_install``, constrained so that Slicer's own numpy and SimpleITK and the
        PyTorch extension's torch are never replaced. Never installs in Slicer's testing mode. Example::

            VAEUDASegmentationLogic().setupPythonRequirements()
        """
        missing = self.missingPythonRequirements()
        if not missing:
            self._requirementsSatisfied = True
            return True
        if slicer.app.testingEnabled():
            logging.info("VAE-UDA: not installing %s in testing mode.", ", ".join(missing))
            return False
        torchMissing = [r for r in missing if r.startswith("torch")]
        others = [r for r in missing if not r.startswith("torch")
                  and not any(r.lower().startswith(p.lower()) for p in SLICER_OWNED_PACKAGES)]
        if torchMissing:
            try:
                import PyTorchUtils   # the PyTorch extension, declared in EXTENSION_DEPENDS
            except ImportError:
                # installed without its dependency (a copied module folder, a manual install)
                slicer.util.errorDisplay("VAE-UDA Segmentation needs PyTorch: install the PyTorch extension "
                                         "from the Extensions Manager, restart Slicer, and try again.")
                return False
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                                  torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                return False
        if others:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "VAE-UDA Segmentation needs these Python packages: " + ", ".join(others)
                    + ". Download and install them now? This takes a few minutes."):
                return False
            constraintsDir = tempfile.mkdtemp(prefix="VAEUDASegmentation-pip-")
            options = {}
            try:
                constraintsPath = os.path.join(constraintsDir, "constraints.txt")
                with open(constraintsPath, "w", encoding="utf-8") as f:
                    f.write(self._installedPackagePins())
                install, requirements, options = self._pipInstallArguments(others, constraintsPath)
                install(requirements, **options)
            except Exception as exc:   # CalledProcessError, from any Slicer
                message = f"VAE-UDA Segmentation could not install {', '.join(others)}: {exc}"
                if isinstance(exc, subprocess.CalledProcessError) and "requester" in options:
                    logging.error(message)   # Slicer's installer has shown its failure dialog, with pip's log
                else:
                    slicer.util.errorDisplay(message)
                return False
            finally:
                shutil.rmtree(constraintsDir, ignore_errors=True)
        stillMissing = self.missingPythonRequirements()
        self._requirementsSatisfied = not stillMissing
        return self._requirementsSatisfied

    @staticmethod
    def _pipInstallArguments(requirements: List[str], constraintsPath: str) -> Tuple[Callable, list, dict]:
        """Slicer's ``pip_install`` and its arguments for ``requirements`` under a constraints file.

        Slicer 5.11's package module (``slicer.packaging``; ``slicer.pydeps`` on the main branch
        for a while before) takes the file as ``constraints`` and shows its progress and failure
        dialogs under the ``requester``'s name; it is called directly, since what
        ``slicer.util.pip_install`` forwards has changed with it. Older Slicer has only
        ``slicer.util.pip_install(requirements)``, which passes a list on to pip as its arguments."""
        import importlib
        for name in ("packaging", "pydeps"):
            try:
                install = importlib.import_module(f"slicer.{name}").pip_install
                parameters = inspect.signature(install).parameters
            except (ImportError, AttributeError, TypeError, ValueError):   # not in this Slicer
                continue
            if "constraints" in parameters:
                options = {"constraints": constraintsPath}
                if "requester" in parameters:
                    options["requester"] = "VAE-UDA Segmentation"
                return install, list(requirements), options
        return slicer.util.pip_install, ["-c", constraintsPath] + list(requirements), {}

    @staticmethod
    def _installedPackagePins() -> str:
        """pip constraints pinning the installed numpy, SimpleITK, torch and torchvision, so no
        install can replace them."""
        from importlib import metadata
        pins = []
        for name in SLICER_OWNED_PACKAGES + PYTORCH_EXTENSION_PACKAGES:
            try:
                pins.append(f"{name}=={metadata.version(name)}\n")
            except metadata.PackageNotFoundError:
                pass
        return "".join(pins)

    def _ensureRequirements(self) -> None:
        if self._requirementsSatisfied or self.engineCommand:
            return
        if not self.setupPythonRequirements(askConfirmation=True):
            raise RuntimeError("VAE-UDA Segmentation needs Python packages that are not installed: "
                               + ", ".join(self.missingPythonRequirements())
                               + "; install them with VAEUDASegmentationLogic().setupPythonRequirements().")

    # -- running the engine

    def isRunning(self) -> bool:
        return self._job is not None

    def cancel(self, detach: bool = False, discardFinished: bool = False) -> None:
        """Stop the running job: kill the engine process and all its children. The scene is not changed.

        A blocking call then raises :class:`JobCancelledError`; a background one reports a
        ``cancelled`` :class:`JobResult` to its ``finishedCallback``, unless ``detach``: then the
        job's callbacks are dropped and nothing is called back (a widget that is being destroyed
        calls it so; the job still cleans up its temporary folder). A background engine that has
        already ended keeps its result (finished at the next poll), unless ``discardFinished`` and
        the job's result goes into the scene (segment, evaluate, the Try-it cohort): a scene being
        closed cancels so, since such a result belongs to that scene. A trained model is a file,
        not scene content: it is kept. A job that has already failed is reported failed, with its
        sentence, either way.
        """
        job = self._job or _RUNNING_JOB[0]     # one made in the console cancels the panel's job too
        if job is not None:
            if detach:
                job.progressCallback = job.finishedCallback = None
            job.process.cancel(evenIfEnded=discardFinished and job.name in SCENE_JOBS)

    def _engineArgs(self) -> List[str]:
        if self.engineCommand:
            return list(self.engineCommand)
        # As Slicer's own package installer runs Python modules: inside Slicer, sys.executable is the
        # application, not a Python interpreter, so there is nothing to fall back on.
        python = shutil.which("PythonSlicer")
        if not python:
            raise RuntimeError("Cannot start the VAE-UDA engine: the PythonSlicer executable is not on the PATH "
                               "(set VAEUDASegmentationLogic().engineCommand to run the engine another way).")
        return [python, "-m", "vaeuda"]

    @staticmethod
    def _engineEnvironment() -> Dict[str, str]:
        env = os.environ.copy()
        # The engine ships beside this file; make ``-m vaeuda`` find it in the child too.
        env["PYTHONPATH"] = MODULE_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        # The pipes are read as UTF-8; on Windows a child would otherwise write its ANSI code page.
        env["PYTHONIOENCODING"] = "utf-8"
        # Slicer shares the cores with the engine: spinning OpenMP workers then wait on descheduled
        # ones (adaptation 4x slower with one of two cores busy; sleeping ones cost 5-25 % when idle,
        # Docs/benchmarks.md). OpenMP reads this at start-up, so it goes into the child's environment.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return env

    def _refuseWhileRunning(self) -> None:
        """One engine at a time in this Slicer, whichever logic started it."""
        running = self._job or _RUNNING_JOB[0]
        if running is not None:
            raise RuntimeError(f"Another VAE-UDA job ({JOB_DESCRIPTIONS.get(running.name, running.name)}) is running; "
                               f"wait for it, or cancel it (its Cancel button in the panel, or "
                               f"VAEUDASegmentationLogic().cancel() in the Python console).")

    @staticmethod
    def _makeTempDir() -> str:
        return tempfile.mkdtemp(prefix="VAEUDASegmentation-", dir=slicer.app.temporaryPath)

    def _run(self, name: str, subcommandArgs: List[str], tempDir: str,
             onSuccess: Optional[Callable[[List[str]], object]], waitForCompletion: bool,
             progressCallback: Optional[Callable[[dict], None]],
             finishedCallback: Optional[Callable[[JobResult], None]], pathNames: Optional[Dict[str, str]] = None):
        """Run ``vaeuda <subcommandArgs> --progress json``; see the class docstring for the two modes.
        ``pathNames``: temporary files by what the user knows them as (inputs, and outputs the job moves
        or imports), for the engine's sentences."""
        try:
            self._refuseWhileRunning()
        except RuntimeError:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        try:
            engine = self._engineArgs()
        except RuntimeError:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        args = [str(a) for a in engine + subcommandArgs[:1] + ["--progress", "json"] + subcommandArgs[1:]]
        logging.info("VAE-UDA: running %s", " ".join(args))
        process = EngineProcess(args, env=self._engineEnvironment(), cwd=tempDir)
        # the engine prints paths as the platform spells them (backslashes on Windows)
        names = {variant: userName for path, userName in (pathNames or {}).items()
                 for variant in (path, os.path.normpath(path))}
        job = _Job(name, process, tempDir, onSuccess, progressCallback, finishedCallback, names)
        try:
            process.start()
        except OSError as exc:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise RuntimeError(f"Cannot start the VAE-UDA engine ({args[0]}): {exc}.") from None
        self._job = _RUNNING_JOB[0] = job
        if not waitForCompletion:
            qt.QTimer.singleShot(self.POLL_INTERVAL_MS, lambda: self._poll(job))
            return None
        try:
            while not process.isFinished():
                self._forward(job, process.events(timeout=0.1))
                slicer.app.processEvents()   # keep the window painting during a long call from the console
            self._forward(job, process.events())
        except BaseException:   # Ctrl-C in the console, or a callback's SystemExit: the job must not stay registered
            process.cancel(evenIfEnded=True)    # (nothing imported, even if the engine had just succeeded)
            self._complete(job)
            raise
        result = self._complete(job)
        if result.status == "cancelled":
            raise JobCancelledError(result.message)
        if result.status == "failed":
            raise JobFailedError(result.message)
        return result.value

    # Events forwarded per poll of a background job: an engine printing fast cannot freeze the GUI.
    EVENTS_PER_POLL = 1000

    def _poll(self, job: _Job) -> None:
        """Timer callback of a background job: forward its events; finish it, or look again later."""
        self._forward(job, job.process.events(limit=self.EVENTS_PER_POLL))
        if job.process.isFinished():
            self._forward(job, job.process.events())     # (what the per-poll limit left)
            self._complete(job)
        else:
            qt.QTimer.singleShot(self.POLL_INTERVAL_MS, lambda: self._poll(job))

    @classmethod
    def _forward(cls, job: _Job, events: List[dict]) -> None:
        for event in events:
            if (job.name == "evaluate" and event.get("event") == "log"
                    and str(event.get("message", "")).startswith(_ENGINE_REFERENCE_NOTE)):
                continue     # evaluate() said it before the job, naming the segments
            if isinstance(event.get("message"), str):
                event["message"] = _namePaths(event["message"], job.pathNames)
            if event.get("event") in ("stage", "log", "error"):
                logging.info("VAE-UDA %s: %s", job.name, event.get("message") or event.get("stage"))
            cls._report(job.name, job.progressCallback, event)

    @staticmethod
    def _report(jobName: str, progressCallback, event: dict) -> None:
        """Give ``event`` to the caller's progress callback, if any; its exception is logged, not raised."""
        if progressCallback:
            try:
                progressCallback(event)
            except Exception:   # the caller's bug must not strand the job (no more polls, no clean-up)
                logging.exception("VAE-UDA %s: the progress callback failed", jobName)

    def _complete(self, job: _Job) -> JobResult:
        """Turn the ended process into a JobResult (importing results on success), always clean up."""
        process = job.process
        try:
            if process.cancelRequested:
                result = JobResult("cancelled", "Cancelled by the user.")
            elif not process.succeeded:
                result = JobResult("failed", _asArguments(_namePaths(process.failureMessage(), job.pathNames)))
            else:
                try:
                    value = job.onSuccess(process.outputs) if job.onSuccess else None
                    result = JobResult("done", outputs=list(process.outputs), value=value)
                except (RuntimeError, ValueError, OSError) as exc:   # foreseen (a node removed meanwhile): no traceback
                    message = _namePaths(str(exc), job.pathNames)
                    logging.error("VAE-UDA %s: %s", job.name, message)
                    result = JobResult("failed", message)
                except Exception as exc:
                    logging.exception("VAE-UDA %s: reading the results failed", job.name)
                    result = JobResult("failed", str(exc))
        except Exception as exc:   # a bug of ours: the job still ends, and its callback still hears of it
            logging.exception("VAE-UDA %s: ending the job failed", job.name)
            result = JobResult("failed", f"ending the VAE-UDA job failed: {exc}")
        finally:
            process.close()
            shutil.rmtree(job.tempDir, ignore_errors=True)
            self._job = None
            _RUNNING_JOB[0] = None
        logging.info("VAE-UDA %s: %s %s", job.name, result.status, result.message)
        if job.finishedCallback:
            try:
                job.finishedCallback(result)
            except Exception:   # the caller's bug: the job's own result (imported, moved into place) stands
                logging.exception("VAE-UDA %s: the finished callback failed", job.name)
        return result

    # -- scene <-> files

    def _writeVolume(self, volumeNode, path: str, what: str = "The input volume") -> None:
        self._requireUsableVolume(volumeNode, what)
        # exportNode leaves the node's storage node (its file name for "Save") untouched.
        if not slicer.util.exportNode(volumeNode, path, {}, world=False):
            raise RuntimeError(f"Could not write volume '{volumeNode.GetName()}' to {path}.")

    def _requireUsableVolume(self, volumeNode, what: str = "The input volume") -> None:
        """Refuse a volume the engine cannot take (``what`` names it in the sentence), before any work."""
        self._requireNode(volumeNode, "vtkMRMLScalarVolumeNode", what)
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"{what} must be a scalar volume, not the label map '{volumeNode.GetName()}'.")
        if volumeNode.GetImageData() is None or 0 in volumeNode.GetImageData().GetDimensions():
            raise ValueError(f"Volume '{volumeNode.GetName()}' has no voxels.")
        components = volumeNode.GetImageData().GetNumberOfScalarComponents()
        if components != 1:   # a vector (e.g. RGB) volume is a vtkMRMLScalarVolumeNode subclass
            raise ValueError(f"Volume '{volumeNode.GetName()}' has {components} components per voxel; "
                             "select a single-channel CT or MR volume.")
        # NIfTI keeps only perpendicular axes: a sheared grid would be written straightened, and the
        # segmentation would come back on another grid than the volume's
        axes = _ijkToRAS(volumeNode)[:3, :3]
        directions = axes / np.linalg.norm(axes, axis=0)
        shear = float(np.abs(directions.T @ directions - np.eye(3)).max())
        if shear > AXES_TOLERANCE:
            raise ValueError(f"Volume '{volumeNode.GetName()}': its IJK-to-RAS axes are not perpendicular (off by "
                             f"{shear:.2g}: a sheared or gantry-tilted grid), so no segmentation can lie on its grid; "
                             f"resample it onto a perpendicular grid first (Resample Scalar/Vector/DWI Volume).")

    @staticmethod
    def _requireNode(node, className: str, what: str, inScene: bool = True) -> None:
        """Refuse, in one sentence, what is not a node of ``className`` (a node ID or name typed in
        the console, a label map where a segmentation is meant) and, with ``inScene``, a node no
        longer in a scene (removed: the job would run, and its result find nothing to go to)."""
        if node is None or not hasattr(node, "IsA") or not node.IsA(className):
            given = "nothing" if node is None else (f"node '{node.GetName()}' ({node.GetClassName()})"
                                                    if hasattr(node, "GetClassName") else repr(node))
            raise ValueError(f"{what} must be a {className} node, not {given}.")
        if inScene and node.GetScene() is None:
            raise ValueError(f"{what} '{node.GetName()}' is in no scene (removed from it?); choose one in the scene.")

    def _checkCall(self, waitForCompletion, progressCallback, finishedCallback, **flags) -> None:
        """What any job's call is refused for before its work (volumes written, packages installed):
        on/off arguments that are not True or False, callbacks that cannot be called, another job
        running."""
        for name, value in {"waitForCompletion": waitForCompletion, **flags}.items():
            _requireFlag(name, value)
        _requireCallback("progressCallback", progressCallback)
        _requireCallback("finishedCallback", finishedCallback)
        self._refuseWhileRunning()

    @staticmethod
    def _requirePortableOnCpu(portable: bool, device: str, cpuBf16: bool = False) -> None:
        """The engine's refusals of ``--portable`` with CUDA or bf16, before the job starts."""
        with _engineCheckAsValueError():
            vaeudaChoices.check_portable(portable, device, cpuBf16)

    @staticmethod
    def _requireChoice(name: str, value, choices: Sequence[str]) -> None:
        """The engine's check of an option's value, as ValueError; ``name``: the batch API's argument,
        as a sentence starts ("The device")."""
        with _engineCheckAsValueError():
            vaeudaChoices.check_choice(name, value, choices)

    @staticmethod
    def _checkOutput(path, inputs: Sequence = (), folder: bool = False, argument: str = "") -> None:
        """Refuse, before the job, an output the finished job could not be moved to (a folder for a
        file or the reverse, a path under a file, a place that cannot be written) or that would
        replace one of ``inputs`` (never overwritten): the engine's own output checks, as ValueError,
        naming ``argument`` where the engine names its ``--out``."""
        try:
            with _engineCheckAsValueError():
                if folder:
                    vaeudaFileio.check_output_dir(path)
                else:
                    vaeudaFileio.check_output_file(path, inputs)
        except ValueError as exc:
            raise ValueError(re.sub(r"--out\b", argument, str(exc)) if argument else str(exc)) from None

    @staticmethod
    def _existingFile(path, what: str) -> str:
        if not _pathOrNone(path):
            raise ValueError(f"Choose a {what}.")
        if os.path.isdir(str(path)):
            raise ValueError(f"{path}: is a folder, not a {what}.")
        if not os.path.isfile(str(path)):
            raise ValueError(f"{path}: {what} not found.")
        return os.path.abspath(str(path))

    @staticmethod
    def _placeInStudy(node, volumeNode) -> None:
        """Put ``node`` beside ``volumeNode`` in the subject hierarchy (the volume's study)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        volumeItem = shNode.GetItemByDataNode(volumeNode)
        nodeItem = shNode.GetItemByDataNode(node)
        if volumeItem and nodeItem:
            shNode.SetItemParent(nodeItem, shNode.GetItemParent(volumeItem))

    def _importSegmentation(self, labelPath: str, inputVolumeNode, outputSegmentationNode,
                            fromIndex: Optional[Sequence[int]], name: Optional[str] = None):
        """Label file (in the input volume's geometry) -> segmentation node with the four named segments.

        Fills ``outputSegmentationNode`` (its old segments are replaced) or a new node named after
        the input volume; its reference geometry is the input volume, it sits under the volume's
        transform and in the volume's study. The labels are imported into a new node first, so
        nothing in the scene changes, ``outputSegmentationNode`` included, if the file is unusable.
        """
        labelmapNode = slicer.util.loadLabelVolume(labelPath, {"name": "VAE-UDA temporary labels", "show": False})
        importedNode = None
        try:
            self._snapToVolumeGrid(labelmapNode, inputVolumeNode)
            classes = classIndicesFromLabelValues(slicer.util.arrayFromVolume(labelmapNode), fromIndex, source=labelPath)
            slicer.util.updateVolumeFromArray(labelmapNode, classes)
            importedNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", name or f"{inputVolumeNode.GetName()} segmentation")
            importedNode.CreateDefaultDisplayNodes()
            self._referToVolume(importedNode, inputVolumeNode)
            # The label file is in the volume's own frame: labelmap, segmentation and volume all sit under
            # the volume's transform, so Slicer neither resamples the labels nor transforms the reference
            # geometry (both happen when parent transforms differ).
            labelmapNode.SetAndObserveTransformNodeID(inputVolumeNode.GetTransformNodeID())
            segmentation = importedNode.GetSegmentation()
            segmentIds = vtk.vtkStringArray()
            for structure in STRUCTURES:   # label value s.index -> the segment of s (STRUCTURES order)
                segmentId = segmentation.AddEmptySegment(structure.key, structure.name, list(structure.color))
                segment = segmentation.GetSegment(segmentId)
                # Our name and colour are meant: Slicer must not replace them as it does auto-generated ones.
                segment.SetNameAutoGenerated(False)
                segment.SetColorAutoGenerated(False)
                segment.SetTag(segment.GetTerminologyEntryTagName(), terminologyEntry(structure))
                segmentIds.InsertNextValue(segmentId)
            if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
                    labelmapNode, importedNode, segmentIds):
                raise RuntimeError(f"{labelPath}: could not import the labels into segmentation "
                                   f"'{(outputSegmentationNode or importedNode).GetName()}'.")
            if outputSegmentationNode is None:
                segmentationNode, importedNode = importedNode, None     # kept
            else:
                segmentationNode = outputSegmentationNode
                segmentationNode.GetSegmentation().RemoveAllSegments()
                self._referToVolume(segmentationNode, inputVolumeNode)
                for index in range(segmentIds.GetNumberOfValues()):
                    if not segmentationNode.GetSegmentation().CopySegmentFromSegmentation(
                            segmentation, segmentIds.GetValue(index), True):
                        raise RuntimeError(f"could not copy segment {segmentIds.GetValue(index)} into segmentation "
                                           f"'{segmentationNode.GetName()}'.")
            self._placeInStudy(segmentationNode, inputVolumeNode)
            return segmentationNode
        finally:
            if importedNode is not None:
                slicer.mrmlScene.RemoveNode(importedNode)
            slicer.mrmlScene.RemoveNode(labelmapNode)

    @staticmethod
    def _snapToVolumeGrid(labelmapNode, volumeNode) -> None:
        """Put labels read from a NIfTI file on the volume's exact grid. NIfTI stores the grid in 32-bit
        floats: a far origin (1e5 mm) comes back hundredths of a millimetre off, beyond the 1e-4 within
        which Slicer takes two grids for one, and the segments would be resampled. Labels on the same
        number of voxels whose grid differs from the volume's by no more than that rounding take the
        volume's; any other difference is left to show."""
        if labelmapNode.GetImageData() is None or volumeNode.GetImageData() is None:
            return
        if labelmapNode.GetImageData().GetDimensions() != volumeNode.GetImageData().GetDimensions():
            return
        labels, volume = _ijkToRAS(labelmapNode), _ijkToRAS(volumeNode)
        # element by element: a far origin must not widen what the axes may differ by
        rounding = 8 * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(volume))
        if np.all(np.abs(labels - volume) <= rounding):
            labelmapNode.CopyOrientation(volumeNode)

    @staticmethod
    def _referToVolume(segmentationNode, volumeNode) -> None:
        """Binary-labelmap source, the volume's transform, then its geometry as reference (the transform
        comes first: Slicer transforms the geometry when the two parent transforms differ)."""
        # Labels can only be imported into a binary-labelmap source (a reused node may hold surfaces).
        segmentationNode.SetSourceRepresentationToBinaryLabelmap()
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)

    # -- the batch API

    def segment(self, inputVolumeNode, modelPath, outputSegmentationNode=None, *, device: str = "auto",
                cpuBf16: bool = False, portable: bool = False, batchSize: Optional[int] = None,
                waitForCompletion: bool = True, progressCallback=None, finishedCallback=None):
        """Segment a volume; returns the vtkMRMLSegmentationNode (None when not waiting).

        The result has one segment per structure (LV myocardium, LA blood cavity, LV blood
        cavity, ascending aorta) with name, colour and SNOMED CT terminology, the input volume
        as reference geometry, placed in the input volume's study. ``outputSegmentationNode``:
        a segmentation to overwrite; None makes a new one named after the volume.
        ``device``: "auto", "cpu" or "cuda". ``cpuBf16``: bf16 on the CPU too (the engine's
        ``--cpu-bf16``: faster on CPUs with native bf16, a few voxels may change label).
        ``portable``: the engine's ``--portable`` (CPU only, slower; as for :meth:`trainSource`).
        ``batchSize``: slices per batch (the engine's default if None); smaller needs less
        memory (rounding may change a few voxels, but not with ``portable``). Example::

            logic = VAEUDASegmentationLogic()
            seg = logic.segment(getNode("ct_1017"), "/data/adapted.safetensors", device="cpu")
            seg.CreateClosedSurfaceRepresentation()   # show in 3D
        """
        self._checkCall(waitForCompletion, progressCallback, finishedCallback, cpuBf16=cpuBf16, portable=portable)
        self._requireChoice("The device", device, vaeudaChoices.DEVICES)
        _requireCount("batchSize", batchSize)
        modelPath = _userPath(modelPath)
        self._requirePortableOnCpu(portable, device, cpuBf16)
        modelPath = self._existingFile(modelPath, "model file")
        try:
            fromIndex = labelValuesOfModel(readModelMetadata(modelPath))
        except ValueError as exc:
            raise ValueError(str(exc) if str(exc).startswith(modelPath) else f"{modelPath}: {exc}") from None
        if outputSegmentationNode is not None:
            self._requireNode(outputSegmentationNode, "vtkMRMLSegmentationNode", "The output segmentation")
        self._requireUsableVolume(inputVolumeNode)
        self._ensureRequirements()
        tempDir = self._makeTempDir()
        try:
            inputPath = os.path.join(tempDir, "input.nii.gz")
            self._writeVolume(inputVolumeNode, inputPath)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        outputDir = os.path.join(tempDir, "output")
        engineLabelPath = os.path.join(outputDir, "input_seg.nii.gz")   # `segment` names it after its input

        def importResult(outputs: List[str]):
            # a background job: the user may have removed the nodes while it ran
            for node, what in ((inputVolumeNode, "input volume"), (outputSegmentationNode, "output segmentation")):
                if node is not None and node.GetScene() is None:
                    raise RuntimeError(f"The {what} '{node.GetName()}' was removed from the scene while the job ran; "
                                       f"nothing was imported.")
            labelPath = next((p for p in outputs if p.endswith("_seg.nii.gz")), engineLabelPath)
            return self._importSegmentation(labelPath, inputVolumeNode, outputSegmentationNode, fromIndex)

        args = ["segment", "--model", modelPath, "--out", outputDir, "--device", device]
        args += _flag("--cpu-bf16", cpuBf16) + _flag("--portable", portable) + _option("--batch-size", batchSize)
        return self._run("segment", args + [inputPath], tempDir, importResult, waitForCompletion,
                         progressCallback, finishedCallback,
                         {inputPath: _volumeName(inputVolumeNode),
                          engineLabelPath: "the segmentation the engine wrote",
                          outputDir: "a temporary folder, imported from there"})

    def trainSource(self, dataFolder, outputModelPath, *, preset: Optional[str] = None,
                    iterations: Optional[int] = None, seed: Optional[int] = None, device: str = "auto",
                    labelConvention: Optional[str] = None, inputSize: Optional[int] = None,
                    batchSize: Optional[int] = None, portable: bool = False, intensityRemap: bool = False,
                    waitForCompletion: bool = True, progressCallback=None, finishedCallback=None):
        """Train a source model on labelled volumes; returns the model path (None when not waiting).

        ``dataFolder``: ``X_image`` / ``X_label`` volume pairs (MR). ``preset``: "cpu" or "paper"
        (engine default if None; "tiny" for tests); ``labelConvention``: "mmwhs" (default),
        "consecutive" or a JSON mapping file; ``inputSize``: slice size in pixels over the preset's
        field of view (the preset's own if None; adaptation and segmentation follow the model's);
        ``batchSize``: slices per training step (the preset's if None; smaller needs less memory, and
        trains another model); ``portable``: the engine's ``--portable``, kernels that do not depend
        on the CPU's instruction set, so that a seed gives the same model whatever thread count or
        instruction-set limit is set (CPU only, 3.5-6x slower; CPUs of another maker have still
        given another model); ``intensityRemap``: the engine's ``--intensity-remap``, not the
        paper's method: the source encoder reads randomly remapped intensities (GIN), so the model
        carries over to other modalities better; adapting such a model has also lost what it had
        (Docs/results.md). The model is written to a temporary folder and moved to
        ``outputModelPath`` only when complete.
        Example::

            logic.trainSource("/data/mr_train", "/data/source.safetensors", preset="cpu", iterations=5000)
        """
        self._checkCall(waitForCompletion, progressCallback, finishedCallback, portable=portable,
                        intensityRemap=intensityRemap)
        self._requireChoice("The device", device, vaeudaChoices.DEVICES)
        dataFolder, outputModelPath = _userPath(dataFolder), _userPath(outputModelPath)
        _requireCount("iterations", iterations, maximum=MAX_ITERATIONS)
        _requireCount("seed", seed, minimum=0, maximum=MAX_SEED)
        _requireCount("inputSize", inputSize)
        _requireCount("batchSize", batchSize, maximum=MAX_BATCH_SIZE)
        convention = _conventionArgument(labelConvention)
        self._requirePortableOnCpu(portable, device)
        if preset is not None:
            self._requireChoice("The preset", preset, vaeudaChoices.PRESET_NAMES)
        if dataFolder is None or str(dataFolder) == "":    # (the panel gives None for its unset path)
            raise ValueError("Choose the training data folder.")
        if os.path.isfile(str(dataFolder)):
            raise ValueError(f"{dataFolder}: is a file; choose the folder that holds the X_image / X_label pairs.")
        if not os.path.isdir(str(dataFolder)):
            raise ValueError(f"{dataFolder}: training data folder not found.")
        if not _pathOrNone(outputModelPath):
            raise ValueError("Choose where to write the trained model.")
        folder = os.path.abspath(str(dataFolder))
        mapping = [] if convention in (None, *vaeudaLabels.BUILTIN_CONVENTIONS) else [convention]
        self._checkOutput(outputModelPath, [os.path.join(folder, name) for name in os.listdir(folder)] + mapping)
        # absolute now: the model is moved there when the job ends, whatever the current folder is then
        outputModelPath = os.path.abspath(str(outputModelPath))
        self._ensureRequirements()
        tempDir = self._makeTempDir()
        tempModel = os.path.join(tempDir, "model" + _modelSuffix(outputModelPath))
        args = ["train-source", "--out", tempModel, "--device", device]
        args += _option("--preset", preset) + _option("--iterations", iterations) + _option("--seed", seed)
        args += _option("--label-convention", convention) + _option("--input-size", inputSize)
        args += _option("--batch-size", batchSize)
        args += _flag("--portable", portable) + _flag("--intensity-remap", intensityRemap)
        args += [os.path.abspath(str(dataFolder))]
        return self._run("train-source", args, tempDir, lambda outputs: _moveInPlace(tempModel, outputModelPath),
                         waitForCompletion, progressCallback, finishedCallback, {tempModel: str(outputModelPath)})

    def adapt(self, sourceModelPath, targetVolumeNodes, outputModelPath, *, iterations: Optional[int] = None,
              seed: Optional[int] = None, device: str = "auto", sourceDataFolder=None, portable: bool = False,
              batchSize: Optional[int] = None, waitForCompletion: bool = True, progressCallback=None,
              finishedCallback=None):
        """Adapt a source model to unlabelled target volumes of the scene; returns the adapted model's path.

        ``targetVolumeNodes``: one volume node or a list (the paper adapts to a single CT). No
        target labels are used. Adaptation keeps training on the labelled source volumes too: by
        default the ones the source model records, or those in ``sourceDataFolder``
        (``X_image``/``X_label`` pairs). ``iterations``, ``batchSize``: the engine's defaults (those
        of the source model's preset) if None. ``portable``: as for :meth:`trainSource`. Example::

            adapted = logic.adapt("/data/source.safetensors", [getNode("ct_1017")], "/data/adapted.safetensors")
        """
        self._checkCall(waitForCompletion, progressCallback, finishedCallback, portable=portable)
        self._requireChoice("The device", device, vaeudaChoices.DEVICES)
        sourceModelPath, outputModelPath = _userPath(sourceModelPath), _userPath(outputModelPath)
        sourceDataFolder = _userPath(sourceDataFolder)
        _requireCount("iterations", iterations, maximum=MAX_ITERATIONS)
        _requireCount("seed", seed, minimum=0, maximum=MAX_SEED)
        _requireCount("batchSize", batchSize, maximum=MAX_BATCH_SIZE)
        self._requirePortableOnCpu(portable, device)
        sourceModelPath = self._existingFile(sourceModelPath, "source model file")
        sourceMeta = readModelMetadata(sourceModelPath)
        if targetVolumeNodes is not None and not isinstance(targetVolumeNodes, (list, tuple)):
            targetVolumeNodes = [targetVolumeNodes]
        if not targetVolumeNodes:
            raise ValueError("Select at least one target volume to adapt to.")
        if not _pathOrNone(outputModelPath):
            raise ValueError("Choose where to write the adapted model.")
        # "." is the console's current folder (the panel gives None for its unset path); the engine runs
        # in a temporary folder, so a relative path is made absolute here
        sourceData = None if sourceDataFolder is None or str(sourceDataFolder) == "" else os.path.abspath(
            str(sourceDataFolder))
        # the model is moved into place after the job: the engine, writing a temporary file, cannot see
        # it replace a labelled source volume, the given ones or those the source model records
        self._checkOutput(outputModelPath, [sourceModelPath, *_sourceVolumes(sourceData, sourceMeta)])
        outputModelPath = os.path.abspath(str(outputModelPath))   # (moved there when the job ends)
        for index, node in enumerate(targetVolumeNodes):
            self._requireUsableVolume(node, f"Target volume {index + 1}")
        self._ensureRequirements()
        tempDir = self._makeTempDir()
        try:
            targets = []
            for index, node in enumerate(targetVolumeNodes):
                targets.append(os.path.join(tempDir, f"target_{index}.nii.gz"))
                self._writeVolume(node, targets[-1], f"Target volume {index + 1}")
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        tempModel = os.path.join(tempDir, "model" + _modelSuffix(outputModelPath))
        args = ["adapt", "--model", sourceModelPath, "--out", tempModel, "--device", device]
        args += _option("--iterations", iterations) + _option("--seed", seed) + _option("--batch-size", batchSize)
        args += _flag("--portable", portable) + targets
        if sourceData is not None:
            args += ["--source-data", sourceData]   # last: it takes one or more values
        return self._run("adapt", args, tempDir, lambda outputs: _moveInPlace(tempModel, outputModelPath),
                         waitForCompletion, progressCallback, finishedCallback,
                         {tempModel: str(outputModelPath),
                          **{path: _volumeName(node) for path, node in zip(targets, targetVolumeNodes)}})

    def evaluate(self, segmentationNode, referenceSegmentationNode, outputTableNode=None, *,
                 waitForCompletion: bool = True, progressCallback=None, finishedCallback=None):
        """Dice and ASSD per structure of a segmentation against a reference; returns a vtkMRMLTableNode.

        Both are compared in the geometry of the segmentation's reference volume, the
        segmentation's largest 3D component of each structure against the whole reference, as in
        the paper (the engine's ``evaluate``). Reference segments are
        matched to structures by terminology code, by name (e.g. "LV myocardium" or "LV-M") or
        by a number in the name (an MM-WHS value such as "Segment_205", or 1..4); a structure the
        reference has no segment for is scored against nothing (Dice 0 where the segmentation has
        it), and the log says which (``progressCallback`` gets it as a ``log`` event). Rows: the four
        structures and "Mean"; columns: Dice [%], ASSD [mm], ASSD [voxel]. ``outputTableNode``: a table
        to fill (its old contents are replaced; removed from the scene while the job runs, it fails the
        job); None makes a new one. Example::

            table = logic.evaluate(getNode("ct_1017 segmentation"), getNode("ct_1017 reference"))
        """
        self._checkCall(waitForCompletion, progressCallback, finishedCallback)
        if segmentationNode is None or referenceSegmentationNode is None:
            raise ValueError("Select a segmentation and a reference segmentation to compare.")
        self._requireNode(segmentationNode, "vtkMRMLSegmentationNode", "The segmentation")
        self._requireNode(referenceSegmentationNode, "vtkMRMLSegmentationNode", "The reference segmentation")
        if outputTableNode is not None:
            self._requireNode(outputTableNode, "vtkMRMLTableNode", "The output table", inScene=False)
        referenceVolume = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
        if referenceVolume is None:
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no reference volume to compare in: "
                             f"give it the volume it was drawn on, in the Python console with "
                             f"segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode) (Segment "
                             f"Editor does so with the first source volume chosen for a new segmentation).")
        if referenceVolume.GetImageData() is None:
            raise ValueError(f"Volume '{referenceVolume.GetName()}' has no voxels.")
        absent = [s.name for s in STRUCTURES if self._segmentIdForStructure(referenceSegmentationNode, s) is None]
        self._ensureRequirements()
        tempDir = self._makeTempDir()
        predDir, refDir = os.path.join(tempDir, "pred"), os.path.join(tempDir, "ref")
        predPath, refPath = os.path.join(predDir, "case_seg.nii.gz"), os.path.join(refDir, EVALUATION_REFERENCE_FILE)
        pathNames = {predPath: f"segmentation '{segmentationNode.GetName()}'",
                     refPath: f"reference segmentation '{referenceSegmentationNode.GetName()}'"}
        try:
            os.makedirs(predDir)
            os.makedirs(refDir)
            for node, path in ((segmentationNode, predPath), (referenceSegmentationNode, refPath)):
                self._writeClassLabels(node, referenceVolume, path)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        if absent:   # said once every refusal is past (a refused call says one thing): scored against an empty
            # reference, Dice 0 wherever the segmentation has the structure
            message = (f"the reference '{referenceSegmentationNode.GetName()}' has no segment for {', '.join(absent)}; "
                       f"scored as empty there.")
            logging.warning("VAE-UDA evaluate: %s", message)
            # as the engine's own notes: the panel shows those in its log box
            self._report("evaluate", progressCallback, {"event": "log", "message": "note: " + message})
        jsonPath = os.path.join(tempDir, "evaluation.json")

        # a console table may be in no scene: only one removed while the job ran fails it
        tableScene = outputTableNode.GetScene() if outputTableNode is not None else None

        def makeTable(outputs: List[str]):
            for node, what in ((segmentationNode, "segmentation"), (referenceSegmentationNode, "reference segmentation"),
                               (outputTableNode if tableScene is not None else None, "output table")):
                if node is not None and node.GetScene() is None:    # removed while the job ran
                    raise RuntimeError(f"The {what} '{node.GetName()}' was removed from the scene while the job ran; "
                                       f"nothing was imported.")
            with open(jsonPath, encoding="utf-8") as f:
                return self._evaluationTable(json.load(f), segmentationNode, outputTableNode, absent)

        args = ["evaluate", "--pred", predDir, "--ref", refDir, "--label-convention", "consecutive", "--json", jsonPath]
        pathNames[jsonPath] = "a temporary file, shown as a table"
        return self._run("evaluate", args, tempDir, makeTable, waitForCompletion, progressCallback, finishedCallback,
                         pathNames)

    def makeTryItCohort(self, outputFolder=None, *, nSource: int = 6, nTarget: int = 6, nTrain: int = 4,
                        size: Optional[int] = 64, seed: int = 0, loadVolume: bool = True,
                        waitForCompletion: bool = True, progressCallback=None, finishedCallback=None):
        """Make a small synthetic MR/CT cohort with the engine (offline) and load one CT; returns a TryItCohort.

        The cohort (``mr_*`` and ``ct_*`` image/label volumes, ``splits.json``; the first ``nTrain``
        of each modality train, ``nTrain`` at most ``nSource`` and ``nTarget``) goes to
        ``outputFolder`` (must be new or empty; default :meth:`defaultTryItFolder`), its MR
        training volumes also to ``outputFolder/source_training``. With ``loadVolume`` the first
        test CT is loaded, with its reference labels as a segmentation for Evaluate. Then: train a
        source model on ``sourceTrainingFolder``, adapt to the CT, segment it. Example::

            cohort = logic.makeTryItCohort()
            model = logic.trainSource(cohort.sourceTrainingFolder, cohort.folder + "/source.safetensors", iterations=300)
        """
        self._checkCall(waitForCompletion, progressCallback, finishedCallback, loadVolume=loadVolume)
        # (a link to an empty folder: the cohort goes into the folder it names, which replaces the empty one)
        outputFolder = os.path.realpath(_userPath(outputFolder or self.defaultTryItFolder()))
        for name, value, minimum, maximum in (("nSource", nSource, 1, None), ("nTarget", nTarget, 1, None),
                                              ("nTrain", nTrain, 0, None), ("seed", seed, 0, MAX_SEED)):
            _requireCount(name, value, minimum, noneForDefault=False, maximum=maximum)   # the defaults are this method's
        _requireCount("size", size)
        if os.path.isdir(outputFolder) and os.listdir(outputFolder):
            raise ValueError(f"{outputFolder}: the folder for the synthetic cohort must be new or empty.")
        self._checkOutput(outputFolder, folder=True, argument="outputFolder")
        self._ensureRequirements()
        tempDir = self._makeTempDir()
        cohortDir = os.path.join(tempDir, "cohort")
        args = ["synth", cohortDir, "--n-source", nSource, "--n-target", nTarget, "--n-train", nTrain, "--seed", seed]
        args += _option("--size", size)

        def loadCohort(outputs: List[str]) -> TryItCohort:
            if os.path.isdir(outputFolder):
                try:
                    os.rmdir(outputFolder)
                except OSError as exc:     # filled while the job ran: nothing of the user's is replaced
                    raise RuntimeError(f"{outputFolder}: cannot take the synthetic cohort ({exc.strerror}; files "
                                       f"were put in it while the cohort was made?); nothing was moved there.") from None
            shutil.move(cohortDir, outputFolder)
            cohort = None
            try:
                with open(os.path.join(outputFolder, "splits.json"), encoding="utf-8") as f:
                    splits = json.load(f)
                cohort = TryItCohort(outputFolder, _linkSourceTraining(outputFolder, splits["mr"]["train"]))
                if loadVolume:
                    prefix = (splits["ct"].get("test") or splits["ct"]["train"])[0]
                    cohort.volumeNode = slicer.util.loadVolume(os.path.join(outputFolder, f"{prefix}_image.nii.gz"),
                                                               {"name": prefix, "show": True})
                    cohort.referenceSegmentationNode = self._importSegmentation(
                        # MM-WHS labels: the other annotated structures (RA, RV, PA) are left out
                        os.path.join(outputFolder, f"{prefix}_label.nii.gz"), cohort.volumeNode, None,
                        None, name=f"{prefix} reference")
            except Exception:
                # all or nothing, as every job: no loaded CT, and the folder free for another try
                if cohort is not None and cohort.volumeNode is not None:
                    slicer.mrmlScene.RemoveNode(cohort.volumeNode)
                shutil.rmtree(outputFolder, ignore_errors=True)
                raise
            return cohort

        return self._run("synth", args, tempDir, loadCohort, waitForCompletion, progressCallback, finishedCallback,
                         {cohortDir: outputFolder})

    @staticmethod
    def defaultInputVolume():
        """The scene's first volume the panel's input selector lists, or None: a node of class
        vtkMRMLScalarVolumeNode itself. The selector hides its subclasses (label maps, vector
        volumes: showChildNodeTypes is off), which the scene's getNodesByClass also returns."""
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetClassName() == "vtkMRMLScalarVolumeNode":
                return node
        return None

    @staticmethod
    def defaultTryItFolder() -> str:
        """A new folder under Slicer's temporary path for a synthetic cohort."""
        return os.path.join(slicer.app.temporaryPath, "VAEUDASegmentation-TryIt-" + time.strftime("%Y%m%d-%H%M%S"))

    # -- evaluation helpers

    @staticmethod
    def _segmentIdForStructure(segmentationNode, structure) -> Optional[str]:
        """The segment that holds ``structure``: by terminology code, by name or key, or by a number in the name."""
        segmentation = segmentationNode.GetSegmentation()
        candidates = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segmentId)
            tag = vtk.reference("")
            code = f"~SCT^{structure.snomed_code}^"
            numbers = [int(n) for n in re.findall(r"\d+", segment.GetName())]
            if segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and code in str(tag.get()):
                rank = 0
            elif segment.GetName().strip().lower() in (structure.name.lower(), structure.key.lower()) \
                    or segmentId.lower() == structure.key.lower():
                rank = 1
            elif numbers and numbers[-1] in (structure.mmwhs_value, structure.index):
                rank = 2
            else:
                continue
            candidates.append((rank, index, segmentId))
        return min(candidates)[2] if candidates else None

    def _writeClassLabels(self, segmentationNode, referenceVolume, path: str) -> None:
        """Write a segmentation as class indices 1..4 (consecutive convention) in the reference volume's geometry."""
        classes = np.zeros(slicer.util.arrayFromVolume(referenceVolume).shape, dtype=np.uint8)
        found = 0
        for structure in STRUCTURES:
            segmentId = self._segmentIdForStructure(segmentationNode, structure)
            if segmentId is None:
                continue
            mask = segmentMask(segmentationNode, segmentId, referenceVolume)
            classes[mask > 0] = structure.index
            found += 1
        if not found:
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' has no segment for any of "
                             + ", ".join(s.name for s in STRUCTURES) + ".")
        ijkToRAS = vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(ijkToRAS)
        labelmapNode = slicer.util.addVolumeFromArray(classes, ijkToRAS, "VAE-UDA temporary labels",
                                                      "vtkMRMLLabelMapVolumeNode")
        try:
            if not slicer.util.exportNode(labelmapNode, path, {}, world=False):
                raise RuntimeError(f"Could not write the labels of '{segmentationNode.GetName()}' to {path}.")
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)

    @staticmethod
    def _evaluationTable(result: dict, segmentationNode, tableNode=None, unreferenced: Sequence[str] = ()):
        """Engine evaluation JSON (vaeuda/metrics.py ``evaluate_dirs``) -> table: structures and Mean x metrics.
        ``unreferenced``: the structures the reference has no segment for, marked so in their row (their
        0 Dice is not a miss of the segmentation's)."""
        metrics = result["volumes"][0]["metrics"]
        mean = result["summary"]["Mean"]
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"{segmentationNode.GetName()} evaluation")
        tableNode.RemoveAllColumns()
        columns = (("Structure", None, 1.0), ("Dice [%]", "dice", 100.0), ("ASSD [mm]", "assd_mm", 1.0),
                   ("ASSD [voxel]", "assd_vox", 1.0))
        for index, (title, _, _) in enumerate(columns):
            tableNode.AddColumn()
            tableNode.RenameColumn(index, title)
        rows = [(s.name + (" (no reference)" if s.name in unreferenced else ""), metrics[s.key]) for s in STRUCTURES]
        rows.append(("Mean", {m: (mean[m] or {}).get("mean") for m in ("dice", "assd_mm", "assd_vox")}))
        for name, values in rows:
            row = tableNode.AddEmptyRow()
            tableNode.SetCellText(row, 0, name)
            for column, (_, key, scale) in enumerate(columns[1:], start=1):
                value = values.get(key)
                tableNode.SetCellText(row, column, "n/a" if value is None else f"{value * scale:.2f}")
        return tableNode


def _option(name: str, value) -> List[str]:
    return [] if value is None else [name, str(value)]


def _flag(name: str, on: bool) -> List[str]:
    return [name] if on else []


def _modelSuffix(path) -> str:
    """The extension of the model file the user asked for, which the job's temporary one keeps: the
    engine notes a name its file dialogs will not list (one not ending in .safetensors)."""
    return os.path.splitext(os.path.basename(str(path)))[1]


def _linkSourceTraining(cohortFolder: str, prefixes: Sequence[str]) -> str:
    """``cohortFolder/source_training`` with the image/label pairs of ``prefixes`` (hard links where
    the file system has them, copies otherwise); returns the folder."""
    folder = os.path.join(cohortFolder, "source_training")
    os.makedirs(folder)
    for prefix in prefixes:
        for suffix in ("_image.nii.gz", "_label.nii.gz"):
            source, target = os.path.join(cohortFolder, prefix + suffix), os.path.join(folder, prefix + suffix)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    return folder


def _moveInPlace(source: str, destination) -> str:
    """Move a finished file from the job's temporary folder to ``destination`` (replacing it); return its path."""
    destination = os.path.abspath(str(destination))
    if not os.path.isfile(source):
        raise RuntimeError(f"{source}: the engine finished without writing this file.")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    staging = destination + ".part"
    try:
        shutil.move(source, staging)   # may copy across file systems: rename into place only when whole
        os.replace(staging, destination)
    except BaseException:
        if os.path.exists(staging):    # e.g. the disk filled during the copy: no half-written file stays
            os.remove(staging)
        raise
    return destination


# ----------------------------------------------------------------------------- self-test

class VAEUDASegmentationTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a tiny synthetic cohort, a tiny model, one segmentation, checked.

    Where the engine's Python packages are missing (Slicer's testing mode on a fresh install
    installs nothing), the Slicer side is checked all the same with a stand-in engine
    (VAEUDASegmentationLib/standinengine.py: the engine's protocol, labels from intensity ranks,
    numpy and SimpleITK only); only without PythonSlicer on the PATH does it skip, saying so.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        missing = VAEUDASegmentationLogic().missingPythonRequirements()
        if missing:
            logging.warning("VAEUDASegmentationTest: the real engine is not tested, it needs %s.", ", ".join(missing))
            self.test_SegmentationWithStandInEngine()
        else:
            self.test_TinyModelSegmentation()

    def test_TinyModelSegmentation(self) -> None:
        logic = VAEUDASegmentationLogic()
        missing = logic.missingPythonRequirements()
        if missing:   # Slicer's self-test runner has no "skipped": say so in the log, where it is read
            logging.warning("VAEUDASegmentationTest: the real engine is not tested, it needs %s.", ", ".join(missing))
            self.delayDisplay("Not tested: the VAE-UDA engine needs " + ", ".join(missing) + ".")
            return
        workDir = tempfile.mkdtemp(prefix="VAEUDASegmentationTest-", dir=slicer.app.temporaryPath)
        try:
            self.delayDisplay("Making a tiny synthetic cohort")
            cohort = logic.makeTryItCohort(os.path.join(workDir, "cohort"), nSource=2, nTarget=2, nTrain=1, size=32)
            volumeNode = cohort.volumeNode
            self.assertIsNotNone(volumeNode)

            self.delayDisplay("Training a tiny model")
            modelPath = logic.trainSource(cohort.sourceTrainingFolder, os.path.join(workDir, "tiny.safetensors"),
                                          preset="tiny", iterations=2, seed=0, device="cpu")
            self.assertTrue(os.path.isfile(modelPath))
            self._checkSegmentation(logic, volumeNode, modelPath, expectedLabels=None)
        finally:
            slicer.mrmlScene.Clear()   # no node left pointing into the folder removed below
            shutil.rmtree(workDir, ignore_errors=True)

    def test_SegmentationWithStandInEngine(self) -> None:
        from VAEUDASegmentationLib import standinengine
        python = shutil.which("PythonSlicer")
        if not python:
            logging.warning("VAEUDASegmentationTest skipped: PythonSlicer is not on the PATH.")
            self.delayDisplay("Skipped: PythonSlicer is not on the PATH.")
            return
        logic = VAEUDASegmentationLogic()
        logic.engineCommand = [python, standinengine.__file__]
        workDir = tempfile.mkdtemp(prefix="VAEUDASegmentationTest-", dir=slicer.app.temporaryPath)
        try:
            self.delayDisplay("Segmenting with a stand-in engine (the engine's packages are not installed)")
            voxels = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)   # K, J, I
            ijkToRAS = np.array([[-0.8, 0, 0, 12.0], [0, -1.1, 0, -30.5], [0, 0, 2.5, 101.0], [0, 0, 0, 1]])
            volumeNode = slicer.util.addVolumeFromArray(voxels, ijkToRAS, "VAE-UDA self-test volume")
            modelPath = standinengine.write_model(os.path.join(workDir, "standin.safetensors"),
                                                  vaeudaLabels.MMWHS.to_dict(), MODEL_FORMAT)
            self._checkSegmentation(logic, volumeNode, modelPath, expectedLabels=standinengine.fake_labels(voxels))
        finally:
            slicer.mrmlScene.Clear()
            shutil.rmtree(workDir, ignore_errors=True)

    def _checkSegmentation(self, logic, volumeNode, modelPath: str, expectedLabels) -> None:
        """Segment ``volumeNode``: named, coloured segments on its geometry, beside it in the subject
        hierarchy (each equal to ``expectedLabels == its MM-WHS value`` when given); then again
        under a transform, where the segmentation must follow the volume, not be resampled, into
        the same segmentation node (its segments replaced, not added to)."""
        self.delayDisplay("Segmenting")
        segmentationNode = logic.segment(volumeNode, modelPath, device="cpu")
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(STRUCTURES))
        for index, structure in enumerate(STRUCTURES):
            segment = segmentation.GetSegment(segmentation.GetNthSegmentID(index))
            self.assertEqual(segment.GetName(), structure.name)
            self.assertEqual(tuple(round(c, 4) for c in segment.GetColor()), structure.color)
        referenceRole = segmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(segmentationNode.GetNodeReference(referenceRole), volumeNode)
        masks = {s.key: segmentMask(segmentationNode, s.key, volumeNode) for s in STRUCTURES}
        for structure in STRUCTURES:
            self.assertEqual(masks[structure.key].shape, slicer.util.arrayFromVolume(volumeNode).shape)
            if expectedLabels is not None:
                self.assertTrue(np.array_equal(masks[structure.key] > 0, expectedLabels == structure.mmwhs_value),
                                structure.name)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(segmentationNode)),
                         shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode)))

        self.delayDisplay("Segmenting the volume under a transform")
        shift = vtk.vtkMatrix4x4()
        shift.SetElement(0, 3, 7.5)   # mm; the segmentation must follow the volume, not be resampled
        transformNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "VAE-UDA test shift")
        transformNode.SetMatrixTransformToParent(shift)
        volumeNode.SetAndObserveTransformNodeID(transformNode.GetID())
        movedNode = logic.segment(volumeNode, modelPath, segmentationNode, device="cpu")
        self.assertIs(movedNode, segmentationNode)
        self.assertEqual(movedNode.GetTransformNodeID(), transformNode.GetID())
        self.assertEqual(movedNode.GetSegmentation().GetNumberOfSegments(), len(STRUCTURES))
        for structure in STRUCTURES:
            mask = segmentMask(movedNode, structure.key, volumeNode)
            self.assertTrue(np.array_equal(mask > 0, masks[structure.key] > 0), structure.name)

        self.delayDisplay("Evaluating the segmentation against itself")
        table = logic.evaluate(segmentationNode, segmentationNode)
        self.assertEqual(table.GetNumberOfRows(), len(STRUCTURES) + 1)      # and the Mean
        self.assertEqual(table.GetCellText(len(STRUCTURES), 0), "Mean")
        if expectedLabels is not None:   # one piece per structure: its largest component is all of it
            for row, structure in enumerate(STRUCTURES):
                self.assertEqual(table.GetCellText(row, 1), "100.00", structure.name)
        self.delayDisplay("Test passed")
