"""Torch transcription of SuperGlobal's official modules (ShihaoShao-GH/SuperGlobal, ICCV 2023).

`modules/coarse_retrieval/{gemp,relup,rgem,sgem}.py` and `modules/reranking/{MDescAug,
RerankwMDA}.py`, written out again for the parity tests: the same torch calls in the same
order, `.cuda()` dropped. Feature maps are NCHW here, as in the original.
"""
import torch
from torch.nn import functional as F


class gemp(torch.nn.Module):  # pylint: disable=invalid-name
  def __init__(self, p=4.6, eps=1e-8):
    super().__init__()
    self.p = p
    self.eps = eps

  def forward(self, x):  # x: [B, C, H*W]
    x = x.clamp(self.eps).pow(self.p)
    return torch.nn.functional.adaptive_avg_pool1d(x, 1).pow(1. / self.p)


class relup(torch.nn.Module):  # pylint: disable=invalid-name
  def __init__(self, alpha=0.014):
    super().__init__()
    self.alpha = alpha

  def forward(self, x):
    return x.clamp(self.alpha)


class rgem(torch.nn.Module):  # pylint: disable=invalid-name
  def __init__(self, pr=2.5, size=5):
    super().__init__()
    self.pr = pr
    self.size = size
    self.lppool = torch.nn.LPPool2d(self.pr, int(self.size), stride=1)
    self.pad = torch.nn.ReflectionPad2d(int((self.size - 1) // 2.))

  def forward(self, x):
    nominater = (self.size ** 2) ** (1. / self.pr)
    return 0.5 * self.lppool(self.pad(x / nominater)) + 0.5 * x


class sgem(torch.nn.Module):  # pylint: disable=invalid-name
  def __init__(self, ps=10., infinity=True):
    super().__init__()
    self.ps = ps
    self.infinity = infinity

  def forward(self, x):  # a list of per-scale descriptors of one image
    x = torch.stack(x, 0)
    if self.infinity:
      x = F.normalize(x, p=2, dim=-1)
      x = torch.max(x, 0)[0]
    else:
      gamma = x.min()
      x = (x - gamma).pow(self.ps).mean(0).pow(1. / self.ps) + gamma
    return x


class MDescAug(torch.nn.Module):
  def __init__(self, M=400, K=9, beta=0.15):  # pylint: disable=invalid-name
    super().__init__()
    self.M = M
    self.K = K + 1
    self.beta = beta

  def forward(self, X, Q, ranks):  # pylint: disable=invalid-name
    ranks_trans_1000 = torch.transpose(ranks, 1, 0)[:, :self.M]
    # torch.tensor(X[...]) in the original.
    X_tensor1 = X[ranks_trans_1000].clone()  # pylint: disable=invalid-name
    res_ie = torch.einsum('abc,adc->abd', X_tensor1, X_tensor1)
    res_ie_ranks = torch.unsqueeze(torch.argsort(-res_ie.clone(), axis=-1)[:, :, :self.K], -1)
    res_ie_ranks_value = torch.unsqueeze(
        -torch.sort(-res_ie.clone(), axis=-1)[0][:, :, :self.K], -1)
    res_ie_ranks_value[:, :, 1:, :] *= self.beta
    res_ie_ranks_value[:, :, 0:1, :] = 1.
    res_ie_ranks = torch.squeeze(res_ie_ranks, -1)
    x_dba = X[ranks_trans_1000]
    x_dba_list = []
    for i, j in zip(res_ie_ranks, x_dba):
      x_dba_list.append(j[i])
    x_dba = torch.stack(x_dba_list, 0)
    x_dba = torch.sum(x_dba * res_ie_ranks_value, 2) / torch.sum(res_ie_ranks_value, 2)
    res_top1000_dba = torch.einsum('ac,adc->ad', Q, x_dba)
    ranks_trans_1000_pre = torch.argsort(-res_top1000_dba, -1)
    rerank_dba_final = []
    for i in range(ranks_trans_1000_pre.shape[0]):
      rerank_dba_final.append(ranks_trans_1000[i][ranks_trans_1000_pre[i]])
    return rerank_dba_final, res_top1000_dba, ranks_trans_1000_pre, x_dba


class RerankwMDA(torch.nn.Module):
  def __init__(self, M=400, K=9, beta=0.15):  # pylint: disable=invalid-name
    super().__init__()
    self.M = M
    self.K = K + 1
    self.beta = beta

  def forward(self, ranks, rerank_dba_final, res_top1000_dba, ranks_trans_1000_pre, x_dba):
    ranks_trans_1000 = torch.stack(rerank_dba_final, 0)
    ranks_value_trans_1000 = -torch.sort(-res_top1000_dba, -1)[0]
    ranks_trans = torch.unsqueeze(ranks_trans_1000_pre[:, :self.K], -1)
    X1 = torch.take_along_dim(x_dba, ranks_trans, 1)  # pylint: disable=invalid-name
    X2 = torch.take_along_dim(  # pylint: disable=invalid-name
        x_dba, torch.unsqueeze(ranks_trans_1000_pre, -1), 1)
    X1 = torch.max(X1, 1, True)[0]  # pylint: disable=invalid-name
    res_rerank = torch.sum(torch.einsum('abc,adc->abd', X1, X2), 1)
    res_rerank = (ranks_value_trans_1000 + res_rerank) / 2.
    res_rerank_ranks = torch.argsort(-res_rerank, axis=-1)
    self.scores = -torch.sort(-res_rerank, -1)[0]  # (added: the final scores, for the tests)
    rerank_qe_final = []
    ranks_transpose = torch.transpose(ranks, 1, 0)[:, self.M:]
    for i in range(res_rerank_ranks.shape[0]):
      rerank_qe_final.append(torch.concat(
          [ranks_trans_1000[i][res_rerank_ranks[i]], ranks_transpose[i]], 0))
    return torch.transpose(torch.stack(rerank_qe_final, 0), 1, 0)
