"""util/atomic.py: the writability probe of a folder is private to its caller."""
import threading

from util.atomic import ensure_writable_dir


def test_processes_probing_one_folder_at_once_all_find_it_writable(tmp_path):
    """Every rank of main_predict.py checks its output folders at the same moment. With one shared probe name, one
    rank removed the file another had just written, which then failed with 'not a writable folder (No such file
    or directory)' and took the run down (gloo's 'Connection closed by peer' on the other rank, 1 run in 10)."""
    errors = []

    def probe():
        for _ in range(300):
            try:
                ensure_writable_dir(tmp_path, "--output_dir")
            except Exception as e:  # noqa: BLE001 - any failure is the defect
                errors.append(str(e))

    threads = [threading.Thread(target=probe) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert list(tmp_path.iterdir()) == []  # no probe file left behind
