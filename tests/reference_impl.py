"""An independent, slow, loop-based implementation of the VRPO objective (plain Python
floats, math module only), written from the estimator in docs/method.md and used to check vrpo.losses."""
import math


def f_sigmoid(z):
    # -log sigmoid(z), written two ways for stability
    return math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))


def f_ramp(z):
    return max(0.0, 1.0 - z) - max(0.0, -0.5 - z)


def f_hinge(z):
    return max(0.0, 1.0 - z)


def f_ipo(z):
    return (z - 0.5) ** 2


BASES = {"sigmoid": f_sigmoid, "ramp": f_ramp, "hinge": f_hinge, "ipo": f_ipo}


def ell(z, p, f):
    return p * f(z) + (1 - p) * f(-z)


def vrpo_one(zc, zr, g, ref_r, ref_g, mask, f, coef=1.0):
    """One example: zc, zr rewards; g aux prob; ref_r list of K rewards; ref_g KxK nested
    list; mask list of K bools."""
    z = zc - zr
    total, count = 0.0, 0
    K = len(ref_r)
    for j in range(K):
        for k in range(j + 1, K):
            if mask[j] and mask[k]:
                total += ell(ref_r[j] - ref_r[k], ref_g[j][k], f)
                count += 1
    return f(z) - coef * ell(z, g, f) + coef * total / count
