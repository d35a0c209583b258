import os, sys, tempfile, statistics
sys.path.insert(0, "bench")
from bench_server import Server, make_model_dir, workload, run_phase
work = tempfile.mkdtemp()
md = os.path.join(work, "model"); os.makedirs(md); make_model_dir(md)
system, chats = workload(3000, 6)
log = open(os.path.join(work, "log"), "w")
for name, kv, disk in (("mlx-lm", False, None), ("kvcore no disk", True, None), ("kvcore disk", True, os.path.join(work, "d")), ("kvcore no disk 2", True, None), ("mlx-lm 2", False, None)):
    s = Server(md, kv, disk, log, os.path.join(work, "st.json"))
    try:
        f, sec = run_phase(s, system, chats)
    finally:
        s.stop()
    print(name, "first", round(f[0], 3), "other", round(statistics.median(f[1:]), 4), "second", round(statistics.median(sec), 4), flush=True)
