# usage: python diag.py GRID  (prints each policy's pretraining diagnostics over seeds)
import sys, json, glob, statistics as st, os
rows = {}
for d in sorted(glob.glob(sys.argv[1] + '/cmp-shift-unet/pretrain/*/summary.json')):
    name = os.path.basename(os.path.dirname(d)); s = json.load(open(d))
    pol = name.split('-seed')[0].replace('unet-', '')
    rows.setdefault(pol, []).append(s)
for pol, ss in rows.items():
    def m(key, src=None):
        vals = [x[key] for x in (src or ss) if isinstance(x.get(key), (int, float))]
        return f"{st.mean(vals):.3f} +- {st.stdev(vals):.3f} (n={len(vals)})" if len(vals) > 1 else (f"{vals[0]:.3f} (n=1)" if vals else "-")
    print(pol, "images/s", m("images_per_s"), "hardness", m("hardness_ratio"), "spearman", m("critic_spearman"), "background", m("background_share"), "agent_params", ss[0].get("agent_parameters"))
    if ss[0].get("stages"):
        for i, stg in enumerate(ss[0]["stages"]):
            src = [x["stages"][i] for x in ss]
            print("   stage", stg["name"], stg["steps"], "hardness", m("hardness_ratio", src), "spearman", m("critic_spearman", src))
