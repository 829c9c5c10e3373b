r"""Budget check for the `digits` preset (issue 14): train single-process on scikit-learn's digits with
preset overrides, print the pixel Frechet distance (500 samples, pooled 16x16 features vs all 1,797
images) at N = 1, 2, 4, 8 at 1/3, 2/3 and all of the steps, and write 3x-upscaled grids (one row per
class, same noise for every N) to /tmp/uxq/. A quick comparison, not a CI test; one thread.
    PYTHONPATH=$PWD python bench/digits_budget.py p4b4_1500 1500 model.patch_size=4 objective.bootstrap_every=4 optim.lr=1e-3
"""
import sys, time, json, torch, numpy as np
from sklearn.datasets import load_digits
from shortcut_ray.presets import get_preset
from shortcut_ray.config import apply_overrides
from shortcut_ray.train_step import TrainState
from shortcut_ray.sampler import sample, fixed_noise
from shortcut_ray.shards import fit_square
from shortcut_ray.evaluation import pooled
from shortcut_ray.fid import FeatureStats
from shortcut_ray.figures import image_grid
from shortcut_ray.shards import png_bytes
torch.set_num_threads(1)
tag, steps = sys.argv[1], int(sys.argv[2]); over = sys.argv[3:]
cfg = apply_overrides(get_preset("digits"), ["train.num_workers=1", f"train.max_steps={steps}"] + over)
d = load_digits(); imgs = np.clip(np.round(d.images*255/16),0,255).astype(np.uint8)
X = torch.tensor(np.stack([fit_square(i,16) for i in imgs])).float().div(127.5).sub(1).unsqueeze(1); Y = torch.tensor(d.target)
st = TrainState.create(cfg, "cpu"); g = torch.Generator().manual_seed(0); t0=time.time()
ref = FeatureStats.from_features(pooled(X).numpy())
res = {}
def ev(step):
    noise = fixed_noise((80,1,16,16), 42); y = torch.arange(80)//8 % 10
    rows=[]
    for n in (1,2,4,128):
        x = sample(st.model, noise, y, n); rows.append(x.numpy())
        open(f"/tmp/uxq/{tag}_s{step}_N{n}.png","wb").write(png_bytes(np.kron(image_grid(x.numpy(),8), np.ones((3,3,1),np.uint8))))
    g2 = torch.Generator().manual_seed(1); nz = torch.randn(500,1,16,16,generator=g2); yy = torch.randint(0,10,(500,),generator=g2)
    fd = {n: FeatureStats.from_features(pooled(sample(st.model, nz, yy, n)).numpy()).frechet_distance(ref) for n in (1,2,4,8)}
    res[step]=fd; print(tag, step, f"{time.time()-t0:.0f}s", {k: round(v,2) for k,v in fd.items()}, flush=True)
while st.step < steps:
    idx = torch.randperm(len(X), generator=g)
    for i in range(0, len(X)-63, 64):
        st.step_on(X[idx[i:i+64]], Y[idx[i:i+64]])
        if st.step % (steps//3) == 0 or st.step == steps: ev(st.step)
        if st.step % 100 == 0: print("step", st.step, f"{time.time()-t0:.0f}s", flush=True)
        if st.step >= steps: break
json.dump(res, open(f"/tmp/uxq/{tag}.json","w"))
