"""Every CLI command and option has a test, and this table says which.

The command tree is walked from ``vzkit.cli:main`` (the console script), so a new command or
option fails here until it has a row in ``COVERED`` naming the tests that exercise it (or, with
a reason, in ``GAPS``). Rows are checked too: each named test must exist, and rows for
commands or options that are gone must go.
"""

from __future__ import annotations

import ast
from pathlib import Path

import click

from vzkit.cli import load_all, main

load_all()  # every command registered, as --help lists them

TESTS = Path(__file__).resolve().parents[1]

# "command path" (the command itself) or "command path --option" -> the tests covering it,
# as "<file under tests/>::<test function>".
_CORE = "unit/test_cli_core.py"
_CMDS = "unit/test_cli_commands.py"
_MAC = "unit/test_cli_macos.py"
_RUN = "e2e/test_run_cli.py"
_SNAP = "e2e/test_qemu_snapshots.py"
_VMS = "unit/test_cli_vms.py"
_NAMED = "e2e/test_named_cli.py"
_ROUND_TRIP = f"{_CORE}::test_config_options_round_trip"
_DEVICES = "unit/test_cli_devices.py::test_add_disk_add_network_and_sound"
_BAD_DEVICES = "unit/test_cli_devices.py::test_bad_device_options_say_what_to_write"
# the options every VM-making command shares (one decorator, one parser): their parsing and
# checks are tested through `config`; the commands that boot pass them on to the same config
VM_OPTIONS: dict[str, list[str]] = {
    "--cpus": [_ROUND_TRIP, f"{_CORE}::test_config_bad_options_exit_2"],
    "--memory": [_ROUND_TRIP, f"{_CORE}::test_config_bad_options_exit_2"],
    "--arch": [_ROUND_TRIP],
    "--kernel": [_ROUND_TRIP],
    "--initrd": [f"{_CMDS}::test_config_initrd_and_iso"],
    "--cmdline": [_ROUND_TRIP],
    "--disk": [f"{_CORE}::test_disk_format_option"],
    "--disk-format": [f"{_CORE}::test_disk_format_option"],
    "--iso": [f"{_CMDS}::test_config_initrd_and_iso"],
    "--state-dir": [_ROUND_TRIP],
    "--add-disk": [_DEVICES, _BAD_DEVICES],
    "--add-network": [_DEVICES, _BAD_DEVICES],
    "--sound": [_DEVICES],
    "--volume": [_ROUND_TRIP, "unit/test_volume_guest_path.py::test_cli_volume_with_a_guest_path"],
    "--network": [_ROUND_TRIP],
    "--publish": [f"{_CORE}::test_config_publish"],
    "--display": [_ROUND_TRIP],
    "--graphics": [
        f"{_CORE}::test_config_file_with_overrides",
        f"{_CORE}::test_config_json_and_save",
    ],
    "--console": [_ROUND_TRIP],
    "--accel": [_ROUND_TRIP],
    "--gui": [_ROUND_TRIP],
    "--rosetta": [_ROUND_TRIP, f"{_CORE}::test_rosetta_needs_an_aarch64_guest_and_the_vz_backend"],
    "--cpu": [_ROUND_TRIP],
    "--config": [f"{_CORE}::test_config_file_with_overrides"],
}
_SHARED = f"{_CMDS}::test_vm_making_commands_share_the_vm_options"
_BOOT_TIMEOUT = f"{_CMDS}::test_boot_timeout_must_be_a_number"

COVERED: dict[str, list[str]] = {
    " --version": [f"{_CORE}::test_version"],
    " --verbose": [f"{_CORE}::test_verbose_and_debug_log_to_stderr"],
    " --debug": [f"{_CORE}::test_verbose_and_debug_log_to_stderr"],
    "codesign": [f"{_MAC}::test_codesign_output_signs_a_copy"],
    "codesign --output": [f"{_MAC}::test_codesign_output_signs_a_copy"],
    "codesign --venv": [f"{_MAC}::test_codesign_venv_replaces_the_symlinks"],
    "codesign --undo": ["unit/test_codesign_links.py::test_undo_puts_the_venv_back_exactly"],
    "completion": [
        "unit/test_cli_completion.py::test_completion_prints_the_shells_script",
        "unit/test_cli_completion.py::test_completion_refuses_other_shells_and_says_how_to_install",
        "unit/test_cli_completion.py::test_the_bash_script_defines_the_function_and_completes_vzkit",
    ],
    "config": [f"{_CORE}::test_config_defaults_print_toml_that_loads_back"],
    **{f"config {option}": tests for option, tests in VM_OPTIONS.items()},
    "config --format": [f"{_CORE}::test_config_json_and_save"],
    "config --save": [f"{_CORE}::test_config_json_and_save"],
    "disk": [f"{_CORE}::test_disk_create"],
    "disk create": [f"{_CORE}::test_disk_create", f"{_CORE}::test_disk_create_bad_size"],
    "disk create --format": [
        f"{_CORE}::test_disk_create_qcow2",
        f"{_CORE}::test_disk_create_qcow2_without_qemu_img",
    ],
    "doctor": [
        f"{_CORE}::test_doctor_names_the_vsock_transport_and_the_share_daemon",
        f"{_CORE}::test_doctor_json_and_the_guests_checks",
    ],
    "doctor --json": [f"{_CORE}::test_doctor_json_and_the_guests_checks"],
    "image": [f"{_CMDS}::test_image_build_list_and_rm"],
    "image build": [f"{_CMDS}::test_image_build_list_and_rm"],
    "image build --arch": [
        f"{_CMDS}::test_image_build_list_and_rm",
        f"{_CMDS}::test_image_build_bad_options_exit_2_and_build_nothing",
    ],
    "image build --deb-dir": [
        f"{_CMDS}::test_image_build_list_and_rm",
        f"{_CMDS}::test_image_build_bad_options_exit_2_and_build_nothing",
    ],
    "image build --source": [
        f"{_CMDS}::test_image_build_list_and_rm",
        f"{_CMDS}::test_image_build_bad_options_exit_2_and_build_nothing",
    ],
    "image build --json": [
        "unit/test_debian_image.py::test_image_build_debian_reports_the_cached_image"
    ],
    "image rm --json": [
        "unit/test_debian_image.py::test_cli_lists_inspects_removes_and_prunes_debian_images"
    ],
    "image prune --json": [
        "unit/test_debian_image.py::test_cli_lists_inspects_removes_and_prunes_debian_images"
    ],
    "image build --packages": [
        "unit/test_debian_image.py::test_image_build_debian_reports_the_cached_image",
        "unit/test_debian_image.py::test_image_build_refuses_bad_combinations",
    ],
    "image inspect": [
        "unit/test_debian_image.py::test_cli_lists_inspects_removes_and_prunes_debian_images"
    ],
    "image inspect --arch": [
        "unit/test_debian_image.py::test_cli_lists_inspects_removes_and_prunes_debian_images"
    ],
    "image inspect --json": [
        "unit/test_debian_image.py::test_cli_lists_inspects_removes_and_prunes_debian_images"
    ],
    "image prune": [
        "unit/test_debian_image.py::test_cli_lists_inspects_removes_and_prunes_debian_images"
    ],
    "image pull": [
        "e2e/test_oci_run.py::test_a_registry_image_is_pulled_listed_and_runs_again_without_the_registry"
    ],
    "image pull --arch": [
        "e2e/test_oci_run.py::test_pull_picks_the_arch_and_names_what_an_image_has"
    ],
    "image pull --platform": [
        "e2e/test_oci_run.py::test_pull_picks_the_arch_and_names_what_an_image_has"
    ],
    "image pull --insecure-registry": [
        "e2e/test_oci_run.py::test_a_registry_image_is_pulled_listed_and_runs_again_without_the_registry"
    ],
    "image pull --json": [
        "e2e/test_oci_run.py::test_a_registry_image_is_pulled_listed_and_runs_again_without_the_registry"
    ],
    "image prune --unused-days": [
        "unit/test_debian_image.py::test_cli_lists_inspects_removes_and_prunes_debian_images"
    ],
    "image build --mirror": [
        "e2e/test_guest_mirror.py::test_mirror_image_is_byte_identical_to_the_apt_image"
    ],
    "image build --refresh": [
        f"{_CMDS}::test_image_build_refresh_rebuilds_nothing_that_did_not_change"
    ],
    "image list": [f"{_CMDS}::test_image_build_list_and_rm"],
    "image list --json": [f"{_CMDS}::test_image_build_list_and_rm"],
    "image rm": [f"{_CMDS}::test_image_build_list_and_rm"],
    "image rm --arch": [
        f"{_CMDS}::test_image_build_list_and_rm",
        f"{_CMDS}::test_image_rm_bad_arch_exits_2",
    ],
    "macos": ["contract/test_macos.py::test_cli_info_and_install_with_a_progress_line"],
    "macos info": ["contract/test_macos.py::test_cli_info_and_install_with_a_progress_line"],
    "macos install": ["contract/test_macos.py::test_cli_info_and_install_with_a_progress_line"],
    "macos install --cpus": [
        "contract/test_macos.py::test_cli_info_and_install_with_a_progress_line"
    ],
    "macos install --memory": [
        "contract/test_macos.py::test_cli_info_and_install_with_a_progress_line"
    ],
    "macos install --disk-size": [
        "contract/test_macos.py::test_cli_install_disk_size_force_and_timeout"
    ],
    "macos install --force": [
        "contract/test_macos.py::test_cli_install_disk_size_force_and_timeout"
    ],
    "macos install --timeout": [
        "contract/test_macos.py::test_cli_install_disk_size_force_and_timeout"
    ],
    "macos latest": ["contract/test_devices.py::test_cli_macos_latest"],
    "macos latest --timeout": ["contract/test_devices.py::test_cli_macos_latest"],
    "macos install-rosetta": ["contract/test_rosetta.py::test_cli_install_rosetta"],
    "macos install-rosetta --timeout": ["contract/test_rosetta.py::test_cli_install_rosetta"],
    "run": [f"{_RUN}::test_run_prints_and_exits_with_the_commands_code"],
    **{f"run {option}": [_SHARED, *tests] for option, tests in VM_OPTIONS.items()},
    "run --arch": [_SHARED, f"{_RUN}::test_run_prints_and_exits_with_the_commands_code"],
    "run --volume": [
        _SHARED,
        "e2e/test_qemu_shares.py::test_vzkit_run_volume",
        "e2e/test_share_paths.py::test_vzkit_run_mounts_at_guest_paths_and_tags_still_at_mnt",
        "unit/test_volume_guest_path.py::test_volume_help_shows_both_forms",
    ],
    "run --backend": [f"{_SNAP}::test_cli_save_then_run_from_the_snapshot"],
    "run --env": [
        f"{_CMDS}::test_run_env_without_a_name_is_a_usage_error_before_any_boot",
        f"{_CMDS}::test_env_and_env_files_as_docker_reads_them",
        f"{_RUN}::test_run_env_workdir_and_boot_timeout",
    ],
    "run --env-file": [
        f"{_CMDS}::test_env_and_env_files_as_docker_reads_them",
        f"{_CMDS}::test_run_env_file_that_cannot_be_read_exits_2_before_any_boot",
        f"{_RUN}::test_run_env_workdir_and_boot_timeout",
    ],
    "run --workdir": [
        f"{_RUN}::test_run_env_workdir_and_boot_timeout",
        f"{_RUN}::test_run_user_runs_the_command_as_that_guest_user",
    ],
    "run --user": [
        f"{_CMDS}::test_run_malformed_user_is_a_usage_error_before_any_boot",
        f"{_RUN}::test_run_user_runs_the_command_as_that_guest_user",
    ],
    "run --interactive": [f"{_RUN}::test_run_interactive_forwards_a_terminals_input"],
    "run --tty": [
        "unit/test_cli_tty.py::test_the_guest_sees_the_size_term_and_a_resize",
        "unit/test_cli_tty.py::test_ctrl_c_is_a_byte_for_the_guest",
        "unit/test_cli_tty.py::test_the_escape_ends_the_session",
        "unit/test_cli_tty.py::test_sigterm_and_sighup_restore_the_terminal",
        "unit/test_cli_tty.py::test_tty_without_a_terminal_is_a_usage_error",
        f"{_RUN}::test_run_tty_sees_the_terminals_size_and_a_resize",
        f"{_RUN}::test_run_tty_ctrl_c_reaches_the_guest_program_and_the_escape_ends_it",
    ],
    "run --boot-timeout": [_BOOT_TIMEOUT, f"{_RUN}::test_run_env_workdir_and_boot_timeout"],
    "run --from-snapshot": [f"{_SNAP}::test_cli_save_then_run_from_the_snapshot"],
    "run --vm-dir": [f"{_SNAP}::test_cli_save_then_run_from_the_snapshot"],
    "run --image": [
        "unit/test_debian_image.py::test_run_image_boots_the_cached_image_on_a_layer",
        "e2e/test_debian_image.py::test_vzkit_run_image_debian_runs_python_and_a_second_build_is_cached",
    ],
    "run --insecure-registry": [
        "unit/test_cli_root.py::test_bad_root_options_exit_2",
        "e2e/test_oci_run.py::test_docker_transport_runs_with_insecure_registry",
    ],
    "run --entrypoint": [
        "e2e/test_oci_run.py::test_the_images_cmd_env_workdir_and_user_take_effect"
    ],
    "run --rootfs": [
        "unit/test_cli_root.py::test_rootfs_becomes_a_cached_root_disk",
        "e2e/test_root_disks.py::test_vzkit_run_rootfs_with_network_and_dns",
    ],
    "run --root": [
        "unit/test_cli_root.py::test_root_and_init_reach_the_kernel_command_line",
        "e2e/test_root_disks.py::test_partitioned_disk_boots_with_root_vda1",
        "e2e/test_root_disks.py::test_a_bad_root_fails_fast_with_the_guests_message",
    ],
    "run --init": [
        "unit/test_cli_root.py::test_bad_root_options_exit_2",
        "e2e/test_root_disks.py::test_init_image_runs_the_images_init_beside_the_agent",
    ],
    "snapshot": [f"{_CORE}::test_snapshot_list_and_rm"],
    "snapshot list": [f"{_CORE}::test_snapshot_list_and_rm"],
    "snapshot list --json": [f"{_CORE}::test_snapshot_list_and_rm"],
    "snapshot rm": [
        f"{_CORE}::test_snapshot_list_and_rm",
        f"{_CORE}::test_snapshot_rm_missing_and_bad_names",
    ],
    "snapshot save": [f"{_SNAP}::test_cli_save_then_run_from_the_snapshot"],
    **{f"snapshot save {option}": [_SHARED, *tests] for option, tests in VM_OPTIONS.items()},
    "snapshot save --backend": [f"{_SNAP}::test_cli_save_then_run_from_the_snapshot"],
    "snapshot save --boot-timeout": [_BOOT_TIMEOUT],
    "snapshot save --insecure-registry": [
        "unit/test_cli_root.py::test_bad_root_options_of_the_snapshot_commands_exit_2"
    ],
    "snapshot restore --insecure-registry": [
        "unit/test_cli_root.py::test_bad_root_options_of_the_snapshot_commands_exit_2"
    ],
    "snapshot restore": [f"{_SNAP}::test_cli_save_then_run_from_the_snapshot"],
    **{f"snapshot restore {option}": [_SHARED, *tests] for option, tests in VM_OPTIONS.items()},
    "snapshot restore --backend": [f"{_SNAP}::test_cli_save_then_run_from_the_snapshot"],
    "snapshot restore --boot-timeout": [_BOOT_TIMEOUT],
    **{
        f"snapshot {command} {option}": [
            "unit/test_cli_root.py::test_the_snapshot_commands_take_runs_root_options",
            "unit/test_cli_root.py::test_bad_root_options_of_the_snapshot_commands_exit_2",
            "e2e/test_root_disk_snapshots.py::test_cli_save_and_run_from_the_snapshot_with_rootfs",
        ]
        for command in ("save", "restore")
        for option in ("--rootfs", "--root", "--init")
    },
    **{
        f"snapshot {command} --image": [
            "unit/test_cli_root.py::test_the_snapshot_commands_take_runs_root_options"
        ]
        for command in ("save", "restore")
    },
}

# -- named VMs ------------------------------------------------------------------------------
_VMS_LIFE = f"{_VMS}::test_create_ls_start_stop_and_rm"
_E2E_LIFE = f"{_NAMED}::test_stop_start_and_rm_leave_nothing_behind"
_E2E_EXEC = f"{_NAMED}::test_exec_prints_and_passes_the_exit_code"
_EXEC = f"{_VMS}::test_exec_passes_output_and_exit_code_through"
_EXEC_STDIN = f"{_VMS}::test_exec_forwards_piped_stdin_and_a_terminals_with_i"
_EXEC_TTY = f"{_VMS}::test_exec_t_sees_the_size_and_a_resize_and_shell_is_a_login_shell"
_CREATE_OPTS = f"{_VMS}::test_create_takes_runs_backend_and_image_options"
_DETACH = f"{_VMS}::test_run_detached_makes_a_named_vm_and_prints_its_name"
_DETACH_REFUSED = f"{_VMS}::test_run_detached_refuses_what_it_cannot_do"
_NAMED_SNAP = f"{_NAMED}::test_snapshot_save_and_restore_of_a_named_vm_and_run_d_rm"
COVERED.update({
    "run --detach": [_DETACH, _DETACH_REFUSED, _E2E_EXEC],
    "run --name": [_DETACH, _DETACH_REFUSED, _E2E_LIFE],
    "run --rm": [
        f"{_VMS}::test_run_rm_without_d_is_accepted",
        f"{_VMS}::test_run_detached_with_rm_asks_for_auto_removal",
        _NAMED_SNAP,
    ],
    "snapshot save --vm": [_NAMED_SNAP],
    "snapshot restore --vm": [_NAMED_SNAP],
    "create": [_VMS_LIFE, _CREATE_OPTS],
    **{f"create {option}": [_SHARED, *tests] for option, tests in VM_OPTIONS.items()},
    "create --memory": [_SHARED, _VMS_LIFE],
    "create --kernel": [_SHARED, _VMS_LIFE, _CREATE_OPTS],
    "create --cmdline": [_SHARED, _CREATE_OPTS],
    "create --backend": [_CREATE_OPTS],
    **{f"create {option}": [_CREATE_OPTS] for option in
       ("--image", "--insecure-registry", "--rootfs", "--root", "--init")},
    "start": [_VMS_LIFE, _E2E_LIFE],
    "start --boot-timeout": [_VMS_LIFE],
    "stop": [_VMS_LIFE, _E2E_LIFE],
    "stop --time": [_VMS_LIFE],
    "rm": [_VMS_LIFE, _E2E_LIFE],
    "rm --force": [f"{_VMS}::test_rm_force_stops_first"],
    "ls": [_VMS_LIFE, f"{_NAMED}::test_ls_and_inspect_show_t1_running"],
    "ls --all": [_VMS_LIFE, _E2E_LIFE],
    "ls --json": [_VMS_LIFE, f"{_NAMED}::test_ls_and_inspect_show_t1_running"],
    "inspect": [f"{_VMS}::test_inspect_shows_the_vm"],
    "inspect --json": [
        f"{_VMS}::test_inspect_shows_the_vm", f"{_NAMED}::test_ls_and_inspect_show_t1_running"
    ],
    "logs": [
        f"{_VMS}::test_logs_prints_and_follows_the_console",
        f"{_NAMED}::test_ls_and_inspect_show_t1_running",
    ],
    "logs --follow": [f"{_VMS}::test_logs_prints_and_follows_the_console"],
    "cp": [
        f"{_VMS}::test_cp_in_and_out_keeps_the_tree",
        f"{_VMS}::test_cp_paths",
        f"{_NAMED}::test_cp_a_20_mib_tree_in_and_back_out_byte_identical",
    ],
    "exec": [_EXEC, f"{_VMS}::test_exec_on_an_unknown_or_stopped_vm_is_125", _E2E_EXEC, _E2E_LIFE],
    "exec --interactive": [_EXEC_STDIN],
    "exec --tty": [
        _EXEC_TTY,
        f"{_VMS}::test_exec_t_escape_ends_the_session_and_says_the_vm_runs_on",
        f"{_NAMED}::test_exec_t_under_a_pty_sees_the_size_and_a_resize",
    ],
    "exec --env": [_EXEC, _E2E_EXEC],
    "exec --env-file": [_EXEC_STDIN],
    "exec --workdir": [_EXEC, _E2E_EXEC],
    "exec --user": [_E2E_EXEC],
    "shell": [_EXEC_TTY, f"{_NAMED}::test_shell_is_a_login_shell_of_the_user_on_a_pty"],
    "shell --workdir": [_EXEC_TTY, f"{_NAMED}::test_shell_is_a_login_shell_of_the_user_on_a_pty"],
    "shell --user": [f"{_NAMED}::test_shell_is_a_login_shell_of_the_user_on_a_pty"],
})  # fmt: skip

# Known holes, each with why; a row here that gets a test moves to COVERED.
GAPS: dict[str, str] = {}


def _surface(command: click.Command, path: tuple[str, ...] = ()) -> list[str]:
    """Each command (by path) and each of its options (by its longest name)."""
    rows = [" ".join(path)] if path else []
    for param in command.params:
        if isinstance(param, click.Option):
            rows.append(f"{' '.join(path)} {max(param.opts, key=len)}")
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            rows += _surface(sub, (*path, name))
    return rows


def _test_functions(file: Path) -> set[str]:
    tree = ast.parse(file.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def test_every_command_and_option_has_a_test() -> None:
    surface = _surface(main)
    assert "run --env" in surface  # the walk is real
    assert "image rm --arch" in surface
    untested = [row for row in surface if row not in COVERED and row not in GAPS]
    assert untested == [], "give these a test and a row in COVERED: " + ", ".join(untested)


def test_every_row_names_a_live_command_and_existing_tests() -> None:
    surface = set(_surface(main))
    assert sorted(set(COVERED) - surface) == [], "rows for commands or options that are gone"
    assert sorted(set(GAPS) - surface) == []
    assert sorted(set(GAPS) & set(COVERED)) == [], "a gap with a test belongs in COVERED only"
    cache: dict[str, set[str]] = {}
    missing = []
    for row, tests in COVERED.items():
        assert tests, row
        for test in tests:
            file, _, name = test.partition("::")
            if file not in cache:
                cache[file] = _test_functions(TESTS / file) if (TESTS / file).is_file() else set()
            if name not in cache[file]:
                missing.append(f"{row}: {test}")
    assert missing == []


def test_the_walk_sees_nested_commands_and_short_options() -> None:
    @click.group()
    def root() -> None: ...

    @root.group()
    def sub() -> None: ...

    @sub.command()
    @click.option("-x", "--extra")
    def leaf(extra: str) -> None: ...

    assert _surface(root) == ["sub", "sub leaf", "sub leaf --extra"]
