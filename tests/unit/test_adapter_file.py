import math

import pytest
import torch
from safetensors.torch import save_file

from core.adapter_file import AdapterFileError, path_inside, read_safetensors, write_safetensors


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.lora_up.weight": torch.randn(8, 2, generator=g), "a.lora_down.weight": torch.randn(2, 4, generator=g),
            "a.alpha": torch.tensor(2.0)}


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", sample_tensors(), {"csa.role": "style"})
    tensors, metadata = read_safetensors(path)
    assert metadata == {"csa.role": "style"}
    for key, value in sample_tensors().items():
        assert torch.equal(tensors[key], value)


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", sample_tensors(), {})
    with pytest.raises(FileExistsError, match="already exists"):
        write_safetensors(path, {"b": torch.zeros(1)}, {})
    assert set(read_safetensors(path)[0]) == set(sample_tensors())
    write_safetensors(path, {"b.alpha": torch.ones(1)}, {}, overwrite=True)
    assert set(read_safetensors(path)[0]) == {"b.alpha"}


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(Exception):
        write_safetensors(tmp_path / "x.safetensors", {"a": "not a tensor"}, {})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(sample_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(AdapterFileError, match="cut.safetensors"):
        read_safetensors(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 4, b"not a safetensors file at all, just text" * 3,
                                     (8).to_bytes(8, "little") + b"[1,2,3]xx"])
def test_garbage_is_rejected_as_not_safetensors(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterFileError, match="junk.safetensors.*(not a safetensors|truncated)"):
        read_safetensors(path)


def test_pickle_formats_are_refused_by_extension(tmp_path):
    path = tmp_path / "old.ckpt"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFileError, match="only .safetensors"):
        read_safetensors(path)


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        read_safetensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_name_the_key(tmp_path, bad):
    tensors = sample_tensors()
    tensors["a.lora_up.weight"][3, 1] = bad
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(AdapterFileError, match=r"nan.safetensors: tensor 'a.lora_up.weight' contains NaN"):
        read_safetensors(path)


def header_file(path, header: bytes):
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    return path


@pytest.mark.parametrize("header, message", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": 5}}', "data_offsets is not a pair of numbers"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": ["x", "y"]}}', "data_offsets is not a pair of numbers"),
    (b'{"__metadata__": [1, 2]}', "__metadata__ is not a JSON object"),
])
def test_malformed_headers_name_the_file_and_the_problem(tmp_path, header, message):
    with pytest.raises(AdapterFileError, match=f"odd.safetensors: malformed safetensors header.*{message}"):
        read_safetensors(header_file(tmp_path / "odd.safetensors", header))


def test_a_bad_role_in_the_metadata_names_the_file():
    from core.formats import adapter_from_tensors

    with pytest.raises(ValueError, match="mine.safetensors: role must be one of"):
        adapter_from_tensors(sample_tensors(), {"csa.role": "texture"}, source="mine.safetensors")


def test_written_files_are_readable_by_others_like_any_saved_model(tmp_path):
    path = write_safetensors(tmp_path / "shared.safetensors", sample_tensors(), {})
    assert path.stat().st_mode & 0o777 == 0o644


def test_pickle_and_torch_save_files_renamed_safetensors_are_named_as_such(tmp_path):
    import pickle

    for name, content in (("renamed_pickle.safetensors", pickle.dumps({"w": [1.0] * 8})),
                          ("renamed_torch_save.safetensors", b"PK\x03\x04" + bytes(60))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(AdapterFileError, match=f"{name}: a pickle or torch.save file renamed"):
            read_safetensors(path)


def test_a_header_length_that_starts_like_a_pickle_still_reads(tmp_path):
    """A 896-byte header begins with the bytes 0x80 0x03, like a pickle; a real safetensors file must still load."""
    import json
    import struct

    header = json.dumps({"a.lora_up.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (896 - len(header))  # safetensors pads headers with spaces
    path = tmp_path / "header_896.safetensors"
    path.write_bytes(struct.pack("<Q", 896) + header + struct.pack("<f", 1.5))
    assert path.read_bytes()[:2] == b"\x80\x03"
    assert read_safetensors(path)[0]["a.lora_up.weight"].tolist() == [1.5]


def test_names_inside_the_folder_are_accepted_even_through_links_the_user_made(tmp_path):
    root, elsewhere = tmp_path / "loras", tmp_path / "elsewhere"
    (elsewhere / "shared").mkdir(parents=True)
    root.mkdir()
    (elsewhere / "style.safetensors").write_bytes(b"")
    (root / "style.safetensors").symlink_to(elsewhere / "style.safetensors")
    (root / "shared").symlink_to(elsewhere / "shared", target_is_directory=True)
    assert path_inside(root, "", "style") == root / "style.safetensors"
    assert path_inside(root, "shared", "style.safetensors") == root / "shared" / "style.safetensors"


@pytest.mark.parametrize("subfolder, filename", [("..", "x"), ("", "../x"), ("a/../..", "x"), ("", "/tmp/x"),
                                                 ("/tmp", "x"), ("", "a\x00b")])
def test_names_that_leave_the_folder_are_refused(tmp_path, subfolder, filename):
    with pytest.raises(ValueError, match="relative name inside the folder"):
        path_inside(tmp_path, subfolder, filename)


def test_huge_finite_values_whose_sum_overflows_still_read(tmp_path):
    huge = torch.full((4, 4), 3e38)  # finite in float32, but their sum is inf
    save_file({"lora_unet_x.lora_up.weight": huge}, str(tmp_path / "huge.safetensors"))
    tensors, _ = read_safetensors(tmp_path / "huge.safetensors")
    assert torch.equal(tensors["lora_unet_x.lora_up.weight"], huge)
    huge[2, 3] = float("nan")
    save_file({"lora_unet_x.lora_up.weight": huge}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(AdapterFileError, match="'lora_unet_x.lora_up.weight' contains NaN"):
        read_safetensors(tmp_path / "nan.safetensors")
