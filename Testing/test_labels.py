"""labels: --label-convention names and JSON mapping files, each way one is refused, and a mapping's round trip."""
from __future__ import annotations

import re

import numpy as np
import pytest

from vaeuda.cli import main
from vaeuda.errors import VaeudaError
from vaeuda.labels import BUILTIN_CONVENTIONS, CONSECUTIVE, MAX_UNKNOWN_VALUES, MMWHS, STRUCTURES, Convention, load_convention


def _mapping(tmp_path, text: str):
    path = tmp_path / "map.json"
    path.write_text(text)
    return path


def test_named_conventions():
    assert load_convention(None) is MMWHS and load_convention("") is MMWHS and load_convention("mmwhs") is MMWHS
    assert load_convention("consecutive") is CONSECUTIVE


@pytest.mark.parametrize("spec", ["MMWHS-v2", "missing.json"])
def test_neither_a_name_nor_a_file_is_refused(tmp_path, spec):
    spec = str(tmp_path / spec) if spec.endswith(".json") else spec
    with pytest.raises(VaeudaError, match=f"^{re.escape(spec)}: label mapping is neither 'mmwhs', 'consecutive' "
                                          f"nor an existing JSON file\\.$"):
        load_convention(spec)


def test_a_folder_is_not_a_mapping_file(tmp_path):
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(tmp_path))}: label mapping is neither"):
        load_convention(str(tmp_path))


def test_invalid_json_is_refused(tmp_path):
    path = _mapping(tmp_path, '{"LV-M": 1, "LA-B": 2,')
    with pytest.raises(VaeudaError,
                       match=f"^{re.escape(str(path))}: label mapping file is not valid JSON \\(.+\\)\\.$"):
        load_convention(str(path))


def test_unknown_structure_is_refused(tmp_path):
    path = _mapping(tmp_path, '{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "RA": 5}')
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: 'RA' is not one of the structures "
                                          f"LV-M, LA-B, LV-B, A-A\\.$"):
        load_convention(str(path))


@pytest.mark.parametrize("text, missing", [
    ('{"LV-M": 1, "LA-B": 2, "LV-B": 3}', "A-A"),
    ('{"LA-B": 2, "A-A": 4}', "LV-M, LV-B"),
    ('{"background": [0]}', "LV-M, LA-B, LV-B, A-A"),
])
def test_structure_without_a_value_is_refused(tmp_path, text, missing):
    """Without this check the missing structure is never read from a label file and is written as 0 (background)."""
    path = _mapping(tmp_path, text)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: label mapping gives no value for {missing}\\.$"):
        load_convention(str(path))


@pytest.mark.parametrize("setting, shown", [('"ignore"', "ignore"), ('"Error"', "Error"), ("null", "None")])
def test_bad_unknown_setting_is_refused(tmp_path, setting, shown):
    path = _mapping(tmp_path, f'{{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "unknown": {setting}}}')
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: 'unknown' must be 'error' or 'background', "
                                          f"not '{shown}'\\.$"):
        load_convention(str(path))


@pytest.mark.parametrize("text, message", [
    # json reads NaN and Infinity; int() of them is a ValueError / OverflowError, not a sentence
    ('{"LV-M": NaN, "LA-B": 2, "LV-B": 3, "A-A": 4}', "the value of 'LV-M' must be a whole number, not nan."),
    ('{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "background": [Infinity]}',
     "the value of 'background' must be a whole number, not inf."),
    # LV-M at 0 would turn every background voxel into myocardium on reading
    ('{"LV-M": 0, "LA-B": 2, "LV-B": 3, "A-A": 4}',
     "'LV-M' and 'background' have the same value 0; each structure and the background need values of their own."),
    ('{"LV-M": 2, "LA-B": 2, "LV-B": 3, "A-A": 4}',
     "'LA-B' and 'LV-M' have the same value 2; each structure and the background need values of their own."),
    ('{"LV-M": 1, "LV myocardium": 5, "LA-B": 2, "LV-B": 3, "A-A": 4}', "'LV myocardium' gives LV-M a second value."),
    # background is written as its first value; with none, what is written could not be read back
    ('{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "background": []}',
     "'background' must give at least one value (the first is what background is written as)."),
    # 1e19 is whole but no label file holds it: numpy's OverflowError, not a sentence, before
    ('{"LV-M": 1e19, "LA-B": 2, "LV-B": 3, "A-A": 4}',
     "the value of 'LV-M' (10000000000000000000) does not fit a 64-bit label file."),
], ids=["NaN", "Infinity", "structure at the background value", "two structures, one value", "a structure twice",
        "no background value", "beyond 64 bits"])
def test_a_mapping_that_cannot_round_trip_is_refused(tmp_path, text, message):
    path = _mapping(tmp_path, text)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: {re.escape(message)}$"):
        load_convention(str(path))


def test_mapping_by_key_or_name_reads_and_writes_its_values(tmp_path):
    """Names and keys in any case; two background values; unknown values as background. Catches a structure
    mapped to another one's index, or a value lost on the way out."""
    path = _mapping(tmp_path, '{"lv myocardium": 11, "LA-B": 12, "lv-b": 13, "Ascending aorta": 14, '
                              '"background": [9, 0], "unknown": "background"}')
    convention = load_convention(str(path))
    assert convention.name == "map.json" and convention.unknown == "background"
    raw = np.array([[0, 11, 12, 13], [14, 9, 77, 11]], np.int32)
    assert convention.encode(raw).tolist() == [[0, 1, 2, 3], [4, 0, 0, 1]]
    assert convention.decode(np.array([0, 1, 2, 3, 4])).tolist() == [9, 11, 12, 13, 14]


def test_mapping_refuses_unknown_values_by_default(tmp_path):
    path = _mapping(tmp_path, '{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4}')
    convention = load_convention(str(path))
    assert convention.encode(np.array([0, 4, 1])).tolist() == [0, 4, 1]
    with pytest.raises(VaeudaError, match=r"^lab\.nii: label values 7 are not in the 'map\.json' label mapping \(a "
                                          r"--label-convention JSON file can list them under \"background\" or set "
                                          r"\"unknown\": \"background\"\)\.$"):
        convention.encode(np.array([0, 4, 7]), source="lab.nii")


def test_an_image_read_as_a_label_map_is_refused():
    """MM-WHS leaves stray values to background; an image's hundreds of whole-number intensities are not stray."""
    image = np.arange(0, 1000, dtype=np.float32).reshape(10, 10, 10)      # 205, 420, 421, 500, 820 among them
    with pytest.raises(VaeudaError, match=r"^img\.nii: 991 of its values \(1, 2, 3, 4, 5, 6, 7, 8, \.\.\.\) are not in "
                                          r"the 'mmwhs' label mapping; is it an image rather than a label map\?$"):
        MMWHS.encode(image, source="img.nii")
    stray = np.array([0, 205, 422, *range(1000, 1000 + MAX_UNKNOWN_VALUES - 1)])   # 32 stray values: still labels
    assert MMWHS.encode(stray).tolist()[:3] == [0, 1, 0]


def test_a_mapping_that_makes_unknown_values_background_takes_any_number_of_them(tmp_path):
    """An atlas of many labels read through its own mapping; the same mapping refusing unknowns says "image"."""
    many = np.arange(60)
    background = load_convention(str(_mapping(tmp_path, '{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "unknown": "background"}')))
    assert background.encode(many).tolist()[:6] == [0, 1, 2, 3, 4, 0]
    refusing = load_convention(str(_mapping(tmp_path, '{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4}')))
    with pytest.raises(VaeudaError, match="55 of its values .* is it an image rather than a label map"):
        refusing.encode(many, source="atlas.nii")


def test_cli_unknown_convention_exits_2_and_writes_nothing(tmp_path, tmp_volume, capsys):
    image = tmp_volume(np.zeros((4, 5, 6), np.float32), name="a_image.nii.gz")
    tmp_volume(np.zeros((4, 5, 6), np.uint8), name="a_label.nii.gz")
    out = tmp_path / "source.safetensors"
    code = main(["train-source", "--preset", "tiny", "--out", str(out), "--progress", "none", "--device", "cpu",
                 "--label-convention", "sifa", str(image)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        ["vaeuda: error: sifa: label mapping is neither 'mmwhs', 'consecutive' nor an existing JSON file."]
    assert not out.exists()


def test_mm_whs_values_read_as_consecutive_name_the_convention_they_are_in():
    with pytest.raises(VaeudaError, match=r"^seg\.nii: label values 205, 420 are not in the 'consecutive' label "
                                          r"mapping; they are 'mmwhs' values: read it with --label-convention "
                                          r"mmwhs\.$"):
        CONSECUTIVE.encode(np.array([0, 205, 420]), "seg.nii")
    with pytest.raises(VaeudaError, match=r"label values 7 are not in the 'consecutive' label mapping \(a "):
        CONSECUTIVE.encode(np.array([0, 1, 7]), "seg.nii")          # in no built-in convention: the JSON way out


@pytest.mark.parametrize("values, dtype", [((0, 1, 2, 3, 255), np.uint8), ((0, 205, 420, 500, 820), np.uint16),
                                           ((-1, 1, 2, 3, 100), np.int8), ((0, 1, 2, 3, 70000), np.uint32),
                                           ((-1, 1, 2, 3, 99999999999), np.int64)])
def test_decoded_labels_take_the_narrowest_integer_type_that_holds_every_value(values, dtype):
    convention = Convention("map", {v: i for i, v in enumerate(values)}, tuple(values))
    decoded = convention.decode(np.array([0, 1, 2, 3, 4]))
    assert decoded.dtype == dtype and decoded.tolist() == list(values)


def test_an_unknown_value_beyond_int64_is_shown_as_it_is():
    """np.unique(...).astype(np.int64) wrapped 2**63 + 5 to a negative number in the sentence."""
    raw = np.array([0, 1, 2 ** 63 + 5], dtype=np.uint64)
    with pytest.raises(VaeudaError, match=r"label values 9223372036854775813 are not in the 'consecutive'"):
        CONSECUTIVE.encode(raw, source="m")
    assert CONSECUTIVE.encode(np.array([0, 1, 4], np.uint64)).tolist() == [0, 1, 4]


def test_mmwhs_reads_the_challenges_stray_421_as_the_la_blood_cavity_and_writes_420():
    """One MM-WHS MR training label marks part of the LA 421; as background that scan's LA would be
    trained and scored as background. Written back, the LA is 420, the challenge's value."""
    la = next(s.index for s in STRUCTURES if s.key == "LA-B")
    raw = np.array([[0, 420], [421, 600]], dtype=np.int16)
    classes = MMWHS.encode(raw)
    assert classes.tolist() == [[0, la], [la, 0]]
    assert MMWHS.decode(classes).tolist() == [[0, 420], [420, 0]]
    # a model file written before the alias stores the convention without it, and reads as today's
    stored = MMWHS.to_dict()
    del stored["to_index"]["421"]
    assert Convention.from_dict(stored) is MMWHS
    stored["to_index"]["420"] = 3                       # edited: read as stored, for the model-file check to refuse
    assert Convention.from_dict(stored).to_index[420] == 3
    other = Convention.from_dict(BUILTIN_CONVENTIONS["consecutive"].to_dict())
    assert other == BUILTIN_CONVENTIONS["consecutive"] and other is not BUILTIN_CONVENTIONS["consecutive"]


def test_a_mapping_file_with_a_repeated_key_too_deep_or_named_like_a_built_in_convention(tmp_path):
    """JSON keeps a repeated key's last value silently (a model trained with LV-M 7 where the file also says
    1); a mapping nested 200000 deep gave a RecursionError traceback; one called mmwhs.json took the built-in
    convention's name, so that a message said its values were not 'mmwhs' values, then to read them as 'mmwhs'."""
    repeated = _mapping(tmp_path, '{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4, "LV-M": 7}')
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(repeated))}: 'LV-M' is given twice in the label mapping; "
                                          f"give each key once\\.$"):
        load_convention(str(repeated))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200000)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(deep))}: label mapping file is not valid JSON"):
        load_convention(str(deep))
    named = tmp_path / "mmwhs.json"
    named.write_text('{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": 4}')
    convention = load_convention(str(named))
    assert convention.name == "mmwhs.json" and convention != MMWHS
    with pytest.raises(VaeudaError, match=r"label values 205, 420, 500, 820 are not in the 'mmwhs\.json' label mapping; "
                                          r"they are 'mmwhs' values: read it with --label-convention mmwhs\.$"):
        convention.encode(np.array([0, 205, 420, 500, 820]))


def test_a_float_label_files_huge_values_are_shown_as_written():
    with pytest.raises(VaeudaError, match=r"^lab\.nii: label values 1e\+300 are not in the 'consecutive' label mapping"):
        CONSECUTIVE.encode(np.array([0.0, 1.0, 1e300]), source="lab.nii")
    with pytest.raises(VaeudaError, match=r"label values 18446744073709551615 are not"):     # integers stay exact
        CONSECUTIVE.encode(np.array([0, 1, 2**64 - 1], dtype=np.uint64), source="lab.nii")


def test_a_complex_valued_label_map_is_refused():
    """numpy dropped the imaginary part, with a ComplexWarning on stderr, and the map was scored."""
    with pytest.raises(VaeudaError, match=r"^seg\.nii: label values must be whole numbers, found complex values\.$"):
        MMWHS.encode(np.array([0, 205 + 1j]), source="seg.nii")


@pytest.mark.parametrize("values", [[0.0, 1.0, np.inf], [0.0, 1.0, -np.inf], [0.0, np.nan, 1.0]])
def test_a_float_label_map_with_infinite_or_nan_values_is_refused_in_one_sentence(values):
    """inf equals its own rounding, so only the finiteness check stops it (int(inf) raised OverflowError)."""
    with pytest.raises(VaeudaError, match=r"^lab\.nii: label values must be whole numbers, found fractional or "
                                          r"non-finite values\.$"):
        CONSECUTIVE.encode(np.array(values, dtype=np.float32), source="lab.nii")


def test_values_of_another_convention_that_hold_no_structure_there_do_not_name_it():
    """550 and 600 (RA, RV) are MM-WHS values, but background in it: 'read it with --label-convention
    mmwhs' would turn the map into all background; the way out named is the JSON mapping."""
    with pytest.raises(VaeudaError, match=r"^seg\.nii: label values 550, 600 are not in the 'consecutive' label "
                                          r"mapping \(a --label-convention JSON file can list them"):
        CONSECUTIVE.encode(np.array([0, 550, 600]), "seg.nii")


def test_a_json_boolean_is_no_label_value(tmp_path):
    """JSON true is a Python bool, an int subclass: without the check LV-M would silently be value 1."""
    path = _mapping(tmp_path, '{"LV-M": true, "LA-B": 2, "LV-B": 3, "A-A": 4}')
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: the value of 'LV-M' must be a whole number, "
                                          f"not True\\.$"):
        load_convention(str(path))


def test_mapping_values_at_the_ends_of_64_bits_are_kept_and_one_beyond_is_refused(tmp_path):
    """-2**63 and 2**63 - 1 fit an int64 label file and round-trip; 2**63 does not (numpy's OverflowError
    in decode, not a sentence, if it got through)."""
    low, high = -2 ** 63, 2 ** 63 - 1
    ends = load_convention(str(_mapping(tmp_path, f'{{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": {high}, '
                                                  f'"background": [{low}]}}')))
    decoded = ends.decode(np.array([0, 1, 4]))
    assert decoded.dtype == np.int64 and decoded.tolist() == [low, 1, high]
    assert ends.encode(np.array([low, 2, high], dtype=np.int64)).tolist() == [0, 2, 4]
    path = _mapping(tmp_path, f'{{"LV-M": 1, "LA-B": 2, "LV-B": 3, "A-A": {2 ** 63}}}')
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: the value of 'A-A' \\({2 ** 63}\\) does not fit "
                                          f"a 64-bit label file\\.$"):
        load_convention(str(path))


def test_builtin_conventions_encode_every_value_by_hand():
    """MM-WHS: each structure's value, the stray 421, the other structures (550, 600, 850) and unknown
    values as background; consecutive: 1..4 and the SIFA files' fifth structure (5) as background. A map
    of background only is no error; a map of unknown values only is (another convention's), and so is
    a fractional value."""
    raw = np.array([0, 205, 420, 421, 500, 820, 550, 600, 850, 7])
    assert MMWHS.encode(raw).tolist() == [0, 1, 2, 2, 3, 4, 0, 0, 0, 0]
    assert MMWHS.decode(np.arange(5)).tolist() == [0, 205, 420, 500, 820]
    assert CONSECUTIVE.encode(np.arange(6)).tolist() == [0, 1, 2, 3, 4, 0]
    assert MMWHS.encode(np.zeros((2, 3), np.int16)).tolist() == [[0] * 3] * 2
    with pytest.raises(VaeudaError, match=r"^m: none of its label values \(1, 3\) is a structure of the 'mmwhs' "
                                          r"label mapping; is it in another label convention\?$"):
        MMWHS.encode(np.array([0, 1, 3]), "m")
    with pytest.raises(VaeudaError, match=r"^m: label values must be whole numbers, found fractional"):
        CONSECUTIVE.encode(np.array([0.0, 1.5]), "m")
