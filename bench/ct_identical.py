"""Tiny CT runs (pretrain without/with cache, finetune classification + segmentation, predict) and a digest of every
output, run against a checkout given as argv[1]; prints JSON {name: sha256}."""
import hashlib, json, os, subprocess, sys, tempfile
root, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=root)
def run(script, *a):
    r = subprocess.run([sys.executable, os.path.join(root, script), *map(str, a)], cwd=out, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r
subprocess.run([sys.executable, "-c", "from util.data.demo import make_demo_data; make_demo_data('demo_data')"],
               cwd=out, env=env, check=True)
common = ["--model", "mae_vit_tiny_patch16", "--input_size", 32, "--patch_size", 8, "--epochs", 2, "--warmup_epochs", 1,
          "--batch_size", 2, "--num_workers", 0, "--blr", 1e-3, "--device", "cpu", "--save_every", 0, "--vis_every", 0]
run("main_pretrain.py", "--data_path", "demo_data/pretrain.csv", "--output_dir", "pre", *common)
run("main_pretrain.py", "--data_path", "demo_data/pretrain.csv", "--output_dir", "pre_cache", "--cache_dir", "cache",
    "--norm_pix_loss", "--window", -1000, 400, *common)
ft = ["--model", "vit_tiny_patch16", "--input_size", 32, "--patch_size", 8, "--epochs", 1, "--warmup_epochs", 0,
      "--batch_size", 2, "--num_workers", 0, "--device", "cpu", "--finetune", "pre/mae_pretrained.pth"]
run("main_finetune.py", "--train_csv", "demo_data/train.csv", "--val_csv", "demo_data/val.csv", "--output_dir", "cls",
    *ft)
run("main_finetune.py", "--train_csv", "demo_data/seg_train.csv" if os.path.exists(os.path.join(out, "demo_data/seg_train.csv")) else "demo_data/train.csv",
    "--val_csv", "demo_data/val.csv", "--output_dir", "seg", "--task", "segmentation", "--cache_dir", "cache", *ft)
run("main_predict.py", "--input_csv", "demo_data/predict.csv", "--finetune", "cls/checkpoint-best.pth",
    "--output_csv", "pred.csv", "--embeddings", "emb.npy", "--num_workers", 0, "--device", "cpu")
import torch
res = {}
for name in ("pre/mae_pretrained.pth", "pre_cache/mae_pretrained.pth", "cls/checkpoint-best.pth", "seg/checkpoint-last.pth"):
    sd = torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k in sorted(sd["model"]):
        h.update(k.encode()); h.update(sd["model"][k].float().numpy().tobytes())
    res[name] = h.hexdigest()[:16]
    res[name + ":preprocess"] = json.dumps(sd.get("preprocess"), sort_keys=True)
for name in ("pred.csv", "emb.npy"):
    res[name] = hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()[:16]
print(json.dumps(res, indent=1))
