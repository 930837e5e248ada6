"""Writes notebooks/quickstart.ipynb from the cells below, executed, with its outputs.

Edit the cells here, then re-run ``python notebooks/make_quickstart.py`` (about a minute on a
CPU): the notebook is committed with its outputs so that it reads on a repository page.
"""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# metalearn quickstart

Library use end to end: sample episodes, meta-train MAML on sine regression, look at how a
task is adapted, and compare MAML, FOMAML and Reptile. Runs on a CPU in about a minute; the
budgets are short so that it does (400 meta-iterations where the paper trains 70,000), and
the figures say what a short run gives, not what the papers report (see the end)."""),
    new_code_cell("""import matplotlib.pyplot as plt
import torch

from metalearn import FOMAML, MAML, Reptile, evaluate
from metalearn.data import OmniglotTasks, SineTasks
from metalearn.models import MLP

_ = torch.manual_seed(0)"""),
    new_markdown_cell("""## Episodes

A `TaskBatch` holds support and query sets with a leading task dimension. Sine tasks are
y = A·sin(x − φ) with A ∈ [0.1, 5], φ ∈ [0, π] (Finn et al. 2017)."""),
    new_code_cell("""sampler = SineTasks(shots=10, queries=10, seed=0)
batch = sampler.sample(4)
print("support_x", tuple(batch.support_x.shape), "query_y", tuple(batch.query_y.shape))
xs = torch.linspace(-5, 5, 200)
fig, axes = plt.subplots(1, 4, figsize=(12, 2.5), sharey=True)
for i, ax in enumerate(axes):
    a, phi = sampler.last_amplitude[i], sampler.last_phase[i]  # the task's true A and φ
    ax.plot(xs, a * torch.sin(xs - phi), color="0.7", label="true")
    ax.scatter(batch.support_x[i], batch.support_y[i], label="support")
    ax.scatter(batch.query_x[i], batch.query_y[i], marker="x", label="query")
    ax.set_title(f"A = {a:.2f}, φ = {phi:.2f}")
axes[0].legend()
plt.show()"""),
    new_markdown_cell("""Omniglot episodes need the two zips (see the README); with `download=True` they are
fetched. Each class is rotated by a random multiple of 90°."""),
    new_code_cell("""try:
    omniglot = OmniglotTasks(split="train", ways=5, shots=1, queries=2, seed=0, progress=False)
except FileNotFoundError as err:
    omniglot = None
    print("Omniglot data not found, skipping:", str(err).splitlines()[0])
if omniglot is not None:
    ep = omniglot.sample(1)
    images = torch.cat([ep.support_x[0], ep.query_x[0]])
    labels = torch.cat([ep.support_y[0], ep.query_y[0]])
    fig, axes = plt.subplots(1, len(images), figsize=(1.3 * len(images), 1.6))
    for ax, img, y in zip(axes, images, labels):
        ax.imshow(img[0], cmap="gray_r")
        ax.set_title(int(y))
        ax.axis("off")
    plt.show()"""),
    new_markdown_cell("""## Meta-train MAML on sine

`step(batch)` puts the exact second-order meta-gradient into `p.grad`; any optimizer applies it."""),
    new_code_cell("""model = MLP()
maml = MAML(model, inner_lr=0.01, inner_steps=1)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
tasks = SineTasks(shots=10, seed=0)
losses = []
for _ in range(400):
    opt.zero_grad()
    losses.append(maml.step(tasks.sample(25))["loss"])
    opt.step()
plt.plot(losses)
plt.xlabel("meta-iteration")
plt.ylabel("query MSE after 1 step")
plt.show()"""),
    new_markdown_cell("""## Adaptation curves

One test task: the meta-learned initialisation, then after 1 and 10 inner steps on 10 points."""),
    new_code_cell("""test_sampler = SineTasks(shots=10, seed=123)
test = test_sampler.sample(1)
a, phi = test_sampler.last_amplitude[0], test_sampler.last_phase[0]
xs = torch.linspace(-5, 5, 200).view(-1, 1)
path = maml.adapt(test.support_x[0], test.support_y[0], steps=10, trajectory=True)
plt.plot(xs, a * torch.sin(xs - phi), color="0.7", linewidth=3, label="true")
plt.scatter(test.support_x[0], test.support_y[0], color="k", label="support")
for k in (0, 1, 10):
    with torch.no_grad():
        plt.plot(xs, maml.predict(path[k], xs), label=f"{k} step" + "s" * (k != 1))
plt.legend()
plt.show()"""),
    new_markdown_cell("""## MAML, FOMAML and Reptile

The same short budget for each, then MSE against test-time inner steps on 200 fixed tasks,
with 95% confidence intervals."""),
    new_code_cell("""test_tasks = SineTasks(shots=10, seed=999).sample(200)
results = {}
for name in ("maml", "fomaml", "reptile"):
    torch.manual_seed(0)
    net = MLP()
    if name == "reptile":
        learner, opt = Reptile(net, 0.02, 5), torch.optim.SGD(net.parameters(), lr=1.0)
    else:
        learner = (MAML if name == "maml" else FOMAML)(net, 0.01, 1)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sampler = SineTasks(shots=10, seed=1)
    for _ in range(400):
        opt.zero_grad()
        learner.step(sampler.sample(25))
        opt.step()
    results[name] = evaluate(learner, test_tasks, max_steps=10, progress=False)
for name, r in results.items():
    plt.errorbar(r.steps, r.mean, yerr=r.ci95, label=name, capsize=2)
plt.xlabel("inner steps at test time")
plt.ylabel("MSE")
plt.legend()
plt.show()
print(results["maml"])"""),
    new_markdown_cell("""400 meta-iterations are a short run: the README's results table gives MAML's MSE after
10 000 of the paper's 70 000 iterations, lower than here (its row links to the command and
the committed result file). `metalearn train --dataset sine --algorithm maml` runs the
paper's full schedule, with checkpoints and validation."""),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3",
                                                          "display_name": "Python 3",
                                                          "language": "python"}})
# Executed in a scratch folder with inline figures, whatever the caller's matplotlib backend.
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
NotebookClient(nb, timeout=600, kernel_name="python3").execute()
nbformat.write(nb, Path(__file__).with_name("quickstart.ipynb"))
