"""faiss.ITQMatrix: the rotation update uses one SVD factor transposed, so the ITQ loss does not fall monotonically.

ITQ (Gong & Lazebnik, "Iterative quantization: a Procrustean approach to learning binary
codes", CVPR 2011) minimises Q(B, R) = ||B - V R||^2_F over B in {-1, +1}^(n x c) and
orthogonal R by alternation: B = sign(V R), then, with B^T V = U_B S U_A^T (SVD),
R = U_A U_B^T (the authors' MATLAB: [UB,S,UA] = svd(B'*V); R = UA*UB').  Each step minimises
Q over one variable with the other fixed, so Q can never increase.

faiss's ITQMatrix::train (faiss/VectorTransform.cpp, also used by ITQTransform) computes
B^T V and its SVD, then sets the rotation to U_A^T U_B^T instead: after one step
|R U_B| == |U_A^T| (absolute values, since the two SVDs may differ in the signs of singular
vector pairs).  U_A^T U_B^T is orthogonal but is not the minimiser, and the loss wanders.

This script trains faiss.ITQMatrix on random data with max_iter = 0, 1, ..., 20 (the same
seed, so every run starts from the same rotation and runs k steps), reads the rotation from
ITQMatrix.A, and computes the loss of each; next to it, the paper's update in numpy from the
same start.  It needs only numpy and faiss: python faiss-itq-repro.py

Output (faiss-cpu 1.15.1 wheel, numpy 2.4.6, Linux x86-64):

    faiss 1.15.1, numpy 2.4.6; x: 5000 x 16
    step  faiss ITQMatrix  paper's update
       0          25.8899         25.8899
       1          25.6465         25.7474
       2          25.6352         25.6650
       3          25.6176         25.6005
       4          25.6053         25.5476
       5          25.5853         25.5072
       6          25.5802         25.4752
       7          25.5591         25.4484
       8          25.5583         25.4243
       9          25.5703         25.4005
      10          25.5672         25.3812
      11          25.5490         25.3673
      12          25.5553         25.3547
      13          25.5739         25.3430
      14          25.5503         25.3332
      15          25.5464         25.3235
      16          25.5377         25.3148
      17          25.5291         25.3065
      18          25.5151         25.2991
      19          25.5208         25.2922
      20          25.5402         25.2853
    faiss loss increases at steps: [9, 12, 13, 19, 20]
    paper loss increases at steps: []
    max | |R1 U_B| - |U_A^T| | = 2.2464140214673023e-08
    max | |R1 U_B| - |U_A|   | = 0.07223720275578649
    paper's R1 = U_A U_B^T: max |R1 U_B - U_A| = 1.3322676295501878e-15

The faiss loss rises at five of the twenty steps; the paper's update never raises it.  (faiss
happens to be lower after steps 1 and 2 here: Q after re-binarising is not what one R-step
minimises, only what it cannot increase.)

The fix, derived from the column-major BLAS calls and not tried on a build of faiss: the last
dgemm_ of each iteration, rotation = u * vt^T ("N", "T"), should be rotation = u * vt
("N", "N").  Reading the buffers row-major, that gives R = U_A U_B^T, the paper's update.
"""
import faiss
import numpy as np

n, d, steps = 5000, 16, 20
rng = np.random.default_rng(0)
# Data as ITQ sees it after PCA: centred, decreasing variances.
x = (rng.standard_normal((n, d)) * np.linspace(3, 0.5, d)).astype(np.float32)


def faiss_rotation(max_iter):
    itq = faiss.ITQMatrix(d)
    itq.max_iter = max_iter             # itq.seed (123) fixes the initial rotation
    itq.train(x)
    r = faiss.vector_to_array(itq.A).reshape(d, d).T.astype(np.float64)
    assert np.allclose(itq.apply(x), x @ r, atol=1e-4)       # ITQMatrix maps x to x @ r
    return r


def loss(r):
    """||B - X R||^2_F / n with B = sign(X R): the quantisation loss per point."""
    z = x @ r
    return np.square(np.where(z >= 0, 1.0, -1.0) - z).sum() / n


def paper_step(r):
    b = np.where(x @ r >= 0, 1.0, -1.0)
    u_b, _, u_a_t = np.linalg.svd(b.T @ x)
    return u_a_t.T @ u_b.T              # R = U_A U_B^T


print(f"faiss {faiss.__version__}, numpy {np.__version__}; x: {n} x {d}")
r0 = faiss_rotation(0)
faiss_losses = [loss(faiss_rotation(k)) for k in range(steps + 1)]
paper_losses, r = [loss(r0)], r0
for _ in range(steps):
    r = paper_step(r)
    paper_losses.append(loss(r))
print("step  faiss ITQMatrix  paper's update")
for k, (a, b) in enumerate(zip(faiss_losses, paper_losses)):
    print(f"{k:4d}  {a:15.4f}  {b:14.4f}")
print("faiss loss increases at steps:", [k for k in range(1, steps + 1) if faiss_losses[k] > faiss_losses[k - 1]])
print("paper loss increases at steps:", [k for k in range(1, steps + 1) if paper_losses[k] > paper_losses[k - 1]])

# One step from the same start, against the SVD of B^T X.
b0 = np.where(x @ r0 >= 0, 1.0, -1.0)
u_b, _, u_a_t = np.linalg.svd(b0.T @ x)
r1 = faiss_rotation(1)
print("max | |R1 U_B| - |U_A^T| | =", np.abs(np.abs(r1 @ u_b) - np.abs(u_a_t)).max())
print("max | |R1 U_B| - |U_A|   | =", np.abs(np.abs(r1 @ u_b) - np.abs(u_a_t.T)).max())
print("paper's R1 = U_A U_B^T: max |R1 U_B - U_A| =", np.abs(paper_step(r0) @ u_b - u_a_t.T).max())
